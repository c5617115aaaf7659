"""AsyncEngine: the LLMEngine behind an asyncio front end (the server's engine client).

The LLMEngine is not thread-safe and its `step()` blocks for the length of a model step, so
it lives on one thread of its own and everything else talks to it through queues:

1. A request handler on the event loop calls `await add_request(...)`. That puts an "add"
   command on a thread-safe queue and waits for the engine thread to acknowledge it. Every
   error `LLMEngine.add_request` raises (prompt too long, bad token ids, ...) comes back
   here, to that request only, before any response has been started.
2. The engine thread loops: it drains the command queue (adds and aborts, in order), runs
   one `step()` while there is work, and hands the step's RequestOutputs back to the event
   loop in one `call_soon_threadsafe` per step. When idle it blocks on the command queue.
3. Each request reads its outputs from a `RequestStream` (an asyncio.Queue). Outputs are
   cumulative, so a reader that fell behind just takes the newest one. Leaving the stream
   early (a client went away) sends an "abort" command, which frees the request's pages.
4. An exception from `step()` fails the requests that were in flight (each stream raises
   `EngineError`) and the loop goes on serving new ones; the server never dies with it.

`EngineClient` is the small interface the server uses; tests drive the server with an
AsyncEngine over a fake core engine that implements the LLMEngine calls used here.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from jaxmm.outputs import RequestOutput
from jaxmm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine failed while running a request; the request was dropped."""


class EngineDeadError(EngineError):
    """The engine thread is not running; no request can be served."""


@runtime_checkable
class EngineClient(Protocol):
    """What the server needs from an engine.

    `engine` is the core engine (LLMEngine-like): the server's blocking front-end work
    (chat templates, tokenization, media) reads its tokenizer and config from a thread
    pool, never touching the scheduler.
    """

    engine: Any

    @property
    def tokenizer(self) -> Any: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def hf_config(self) -> Any: ...

    @property
    def is_running(self) -> bool: ...

    async def add_request(
        self,
        request_id: str,
        prompt: str | None,
        params: SamplingParams,
        *,
        prompt_ids: list[int] | None = None,
        mm: Any = None,
        arrival_time: float | None = None,
    ) -> RequestStream: ...

    def abort(self, request_id: str) -> None: ...

    def get_stats(self) -> dict: ...

    def shutdown(self) -> None: ...


class RequestStream:
    """The outputs of one request, cumulative, newest first come first served.

    Iterate it (`async for out in stream`); the last output has `finished=True`. `abort()`
    ends it early; it is idempotent and a no-op once the request finished.
    """

    def __init__(self, request_id: str, client: AsyncEngine):
        self.request_id = request_id
        self._client = client
        self._queue: asyncio.Queue = asyncio.Queue()
        self.finished = False

    def _put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        # outputs are cumulative: a slow reader skips straight to the newest one
        while not isinstance(item, BaseException) and not self._queue.empty():
            item = self._queue.get_nowait()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._client.abort(self.request_id)


@dataclass
class _Add:
    request_id: str
    prompt: str | None
    params: SamplingParams
    prompt_ids: list[int] | None
    mm: Any
    arrival_time: float
    stream: RequestStream
    ack: asyncio.Future
    loop: asyncio.AbstractEventLoop


@dataclass
class _Abort:
    request_ids: list[str]


@dataclass
class _Sink:
    """The engine thread's handle on one request's stream (used only on that thread)."""

    stream: RequestStream
    loop: asyncio.AbstractEventLoop
    pending: list = field(default_factory=list)


_STOP = object()


def _resolve(fut: asyncio.Future, exc: BaseException | None) -> None:
    if fut.done():  # the waiter was cancelled meanwhile
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


def _deliver(items: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
    for stream, item in items:
        stream._put(item)


def quiet_gc() -> None:
    """Before serving: everything allocated so far (model, compiled programs, tokenizer)
    lives for the process, so move it out of the collector's view, which makes collections
    cheap; and run young-generation collections 100x less often (each one also runs JAX's
    collector callback, which showed up as ~6% of the engine thread at saturation)."""
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, 70_000), gen1, gen2)


class EngineView:
    """What every engine client shows the server of its core engine (read-only), and
    `generate` over the client's `add_request`."""

    engine: Any

    async def generate(
        self,
        request_id: str,
        prompt: str | None,
        params: SamplingParams,
        **kwargs,
    ) -> AsyncIterator[RequestOutput]:
        """`add_request` + iterate, aborting the request if the caller stops early."""
        stream = await self.add_request(request_id, prompt, params, **kwargs)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def hf_config(self) -> Any:
        return self.engine.hf_config


class AsyncEngine(EngineView):
    """Runs a core engine (an `LLMEngine`) on its own thread; see the module docstring."""

    def __init__(self, engine: Any, *, start: bool = True, idle_wait_s: float = 1.0):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._idle_wait_s = idle_wait_s
        self._thread: threading.Thread | None = None
        self._stats: dict = dict(engine.get_stats())
        self._dead: BaseException | None = None
        self.num_step_failures = 0
        # The engine thread and the event loop share the interpreter lock. With Python's
        # default 5 ms switch interval the loop can wait up to 5 ms behind the engine's host
        # work before it sends a token; 0.5 ms bounds that wait (process-wide setting).
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        if start:
            self.start()

    @classmethod
    def from_config(cls, config, **kwargs) -> AsyncEngine:
        from jaxmm.engine.llm_engine import LLMEngine

        return cls(LLMEngine(config), **kwargs)

    # -- what the server reads --------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    def get_stats(self) -> dict:
        """The engine's stats as of its last step (a snapshot taken on the engine thread)."""
        return dict(self._stats)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        quiet_gc()
        self._thread = threading.Thread(target=self._run, name="jaxmm-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        self._commands.put(_STOP)
        self._thread.join(timeout)

    # -- requests -----------------------------------------------------------------------------
    async def add_request(
        self,
        request_id: str,
        prompt: str | None,
        params: SamplingParams,
        *,
        prompt_ids: list[int] | None = None,
        mm: Any = None,
        arrival_time: float | None = None,
    ) -> RequestStream:
        """Queue a request; returns its stream once the engine accepted it.

        Raises what `LLMEngine.add_request` raises (ValueError/TypeError for bad input), or
        EngineDeadError when the engine thread is gone.
        """
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        loop = asyncio.get_running_loop()
        stream = RequestStream(request_id, self)
        ack = loop.create_future()
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        self._commands.put(
            _Add(request_id, prompt, params, prompt_ids, mm, arrival, stream, ack, loop)
        )
        try:
            await ack
        except asyncio.CancelledError:
            # the caller went away before the engine answered: commands run in order, so
            # this abort lands after the add
            self.abort(request_id)
            raise
        return stream

    def abort(self, request_id: str | list[str]) -> None:
        """Thread-safe; unknown or finished ids are ignored."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        self._commands.put(_Abort(ids))

    # -- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        sinks: dict[str, _Sink] = {}
        try:
            while True:
                busy = self.engine.has_unfinished_requests()
                commands = self._drain(block=not busy)
                if any(c is _STOP for c in commands):
                    break
                for cmd in commands:
                    self._handle(cmd, sinks)
                if self.engine.has_unfinished_requests():
                    self._step(sinks)
                self._stats = dict(self.engine.get_stats())
        except BaseException as e:  # a bug in the loop itself: fail everyone, stay dead
            logger.exception("engine loop died")
            self._dead = e
            self._fail(sinks, EngineDeadError(f"the engine stopped: {type(e).__name__}"))
            self._fail_pending(EngineDeadError("the engine stopped"))
            return
        self._fail(sinks, EngineDeadError("the engine was shut down"))
        self._fail_pending(EngineDeadError("the engine was shut down"))

    def _drain(self, block: bool) -> list:
        commands = []
        if block:
            try:
                commands.append(self._commands.get(timeout=self._idle_wait_s))
            except queue.Empty:
                return commands
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _handle(self, cmd, sinks: dict[str, _Sink]) -> None:
        if isinstance(cmd, _Abort):
            live = [rid for rid in cmd.request_ids if rid in sinks]
            if live:
                self.engine.abort_request(live)
                for rid in live:
                    sinks.pop(rid)
            return
        try:
            self.engine.add_request(
                cmd.request_id,
                cmd.prompt,
                cmd.params,
                cmd.arrival_time,
                prompt_ids=cmd.prompt_ids,
                mm=cmd.mm,
            )
        except Exception as e:  # bad input: this request only
            cmd.loop.call_soon_threadsafe(_resolve, cmd.ack, e)
            return
        sinks[cmd.request_id] = _Sink(cmd.stream, cmd.loop)
        cmd.loop.call_soon_threadsafe(_resolve, cmd.ack, None)

    def _step(self, sinks: dict[str, _Sink]) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            self.num_step_failures += 1
            logger.exception("engine step failed; dropping the %d requests in flight", len(sinks))
            try:
                self.engine.abort_request(list(sinks))
            except Exception:
                logger.exception("abort after a failed step failed too")
            # the cause stays in the log: its text may name internals a client should not see
            self._fail(sinks, EngineError("the engine failed while running this request"))
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            sink = sinks.get(out.request_id)
            if sink is None:  # aborted meanwhile
                continue
            if out.finished:
                del sinks[out.request_id]
            by_loop.setdefault(sink.loop, []).append((sink.stream, out))
        for loop, items in by_loop.items():
            _call_soon(loop, _deliver, items)

    def _fail(self, sinks: dict[str, _Sink], exc: BaseException) -> None:
        for sink in sinks.values():
            _call_soon(sink.loop, _deliver, [(sink.stream, exc)])
        sinks.clear()

    def _fail_pending(self, exc: BaseException) -> None:
        for cmd in self._drain(block=False):
            if isinstance(cmd, _Add):
                _call_soon(cmd.loop, _resolve, cmd.ack, exc)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # that event loop is closed: nobody is listening any more
        pass
