"""ProcessEngine: the LLMEngine in a process of its own, behind the server's EngineClient.

Why a process: in one process the engine loop (scheduling, launching steps, building
outputs) and the HTTP event loop (parsing, JSON, SSE writes) take turns on one interpreter
lock, and at saturation each slows the other down (docs/performance.md). With the engine
core in its own process, steps run at the offline engine's pace and the server process only
turns outputs into events. When the server falls behind, a request's cumulative outputs
merge (`RequestStream` keeps the newest) and one event carries several tokens.

The two processes and their threads:

- The core process (spawned; the only process that initialises JAX) builds the LLMEngine,
  then loops: read the commands waiting on the command pipe (add, abort, call, stop), run
  one step while there is work, and queue the step's outputs as one message of deltas. A
  sender thread pickles and writes the messages, so a slow reader never stalls a step.
- In the server process the event loop puts commands on a queue that a sender thread
  writes (a full pipe never blocks the event loop). A reader thread reads the core's
  messages, folds each request's deltas into a cumulative RequestOutput, and hands a step's
  outputs to the event loop in one `call_soon_threadsafe`.

Messages are pickled tuples. Server to core: ("add", rid, prompt, params, prompt_ids,
arrival), ("prepare", rid, pending, params, arrival), ("abort", [rid, ...]), ("call",
call_id, fn, args), ("stop",). Core to server: ("ready", info), ("startup_failed", text),
("ack", rid, error, prepared (text, ids) or None), ("out", deltas, stats),
("stats", stats), ("fail", [rid, ...]), ("result", call_id, value, error).

A delta carries, per completion, how much of the text and token list the server already has
and what follows: outputs stay cumulative for the server's code (as with AsyncEngine) while
each step sends only its new tokens, so a step costs the same at token 10 and token 1000.

The server side reads the tokenizer, the HF config and the engine config from the checkpoint
itself (`FrontendView`); it never loads weights or touches a device. Every model family
takes this path. A multimodal prompt is prepared in the core, by the engine's own front
end (media decoding, the HF processor, hashing: host work, on a pool of threads beside the
loop): the server sends it as ("prepare", rid, pending prompt, params, arrival), the core
adds the request once it is ready and acknowledges with its token ids. Chat messages with
media parts are still rendered in the server process, from the model's declared
multimodal interface that the core sends with "ready" (`multimodal.interface`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from jaxmm.engine.async_engine import (
    EngineDeadError,
    EngineError,
    EngineView,
    RequestStream,
    _call_soon,
    _deliver,
    _resolve,
    quiet_gc,
)
from jaxmm.engine.prompts import tokenize_prompt
from jaxmm.outputs import CompletionOutput, RequestOutput
from jaxmm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# threads preparing multimodal prompts in the core (media decoding and HF processing
# release the interpreter lock for their large copies; more threads only contend)
PREPARE_THREADS = 2
# what an add's error may be sent back as: the exceptions bad input raises
_PORTABLE_ERRORS = (ValueError, TypeError, OverflowError)


def _portable(e: BaseException) -> BaseException:
    """An add's exception as the server process may see it: bad-input errors keep their type
    and text; anything else becomes a generic EngineError (its text stays in the log)."""
    from jaxmm.multimodal.fetch import MediaError

    if isinstance(e, MediaError):  # refused media keeps its status (400 / 413)
        return MediaError(str(e), e.status)
    if type(e) in _PORTABLE_ERRORS:
        return type(e)(str(e))
    if isinstance(e, _PORTABLE_ERRORS):  # e.g. a template or processor error: its message
        return ValueError(str(e))
    logger.error("the engine refused a request", exc_info=e)
    return EngineError("the engine could not take this request")


# -- deltas --------------------------------------------------------------------------------------


class DeltaEncoder:
    """Core side: each RequestOutput as what is new since the last one sent for its request.

    A delta is (request_id, finished, num_cached_tokens, metrics, [completion, ...],
    prompt_logprobs) with a
    completion (index, text_keep, text_tail, tokens_keep, token_tail, logprob_tail,
    cumulative_logprob, finish_reason, stop_reason): the new text is the old one's first
    `text_keep` characters + `text_tail` (text can shrink: a stop string is cut off), the new
    token list the old one's first `tokens_keep` ids + `token_tail` (logprobs likewise).
    Prompt logprobs (complete by a request's first output) go with its first delta only.
    """

    def __init__(self):
        self._sent: dict[str, dict[int, tuple[str, int]]] = {}

    def encode(self, out: RequestOutput) -> tuple:
        sent = self._sent.get(out.request_id)
        first = sent is None
        if sent is None:
            sent = self._sent[out.request_id] = {}
        comps = []
        for o in out.outputs:
            old_text, old_n = sent.get(o.index, ("", 0))
            if o.text.startswith(old_text):
                keep = len(old_text)
            else:
                keep = len(os.path.commonprefix([old_text, o.text]))
            n = min(old_n, len(o.token_ids))
            comps.append(
                (
                    o.index,
                    keep,
                    o.text[keep:],
                    n,
                    o.token_ids[n:],
                    None if o.logprobs is None else o.logprobs[n:],
                    o.cumulative_logprob,
                    o.finish_reason,
                    o.stop_reason,
                )
            )
            sent[o.index] = (o.text, len(o.token_ids))
        if out.finished:
            del self._sent[out.request_id]
        plp = out.prompt_logprobs if first else None
        return (out.request_id, out.finished, out.num_cached_tokens, out.metrics, comps, plp)

    def forget(self, request_ids) -> None:
        for rid in request_ids:
            self._sent.pop(rid, None)


def merge_deltas(first: list, second: list) -> list:
    """Two consecutive steps' deltas as one (a reader that fell behind takes them at once)."""
    merged = {d[0]: d for d in first}
    for d in second:
        a = merged.get(d[0])
        merged[d[0]] = d if a is None else _merge_delta(a, d)
    return list(merged.values())


def _merge_delta(a: tuple, b: tuple) -> tuple:
    rid, finished, num_cached, metrics, comps_b, plp = b
    comps = {c[0]: c for c in a[4]}
    for c in comps_b:
        p = comps.get(c[0])
        comps[c[0]] = c if p is None else _merge_completion(p, c)
    return (rid, finished, num_cached, metrics, list(comps.values()), a[5] or plp)


def _merge_completion(p: tuple, c: tuple) -> tuple:
    idx, k1, t1, n1, ids1, lps1 = p[:6]
    _, k2, t2, n2, ids2, lps2, cum, finish, stop = c
    # c's keeps count in the text/tokens that p produced: old[:k1] + t1
    keep, tail = (k1, t1[: k2 - k1] + t2) if k2 >= k1 else (k2, t2)
    if n2 >= n1:
        n, ids = n1, ids1[: n2 - n1] + ids2
        lps = None if lps2 is None else (lps1 or [])[: n2 - n1] + lps2
    else:
        n, ids, lps = n2, ids2, lps2
    return (idx, keep, tail, n, ids, lps, cum, finish, stop)


@dataclass
class _Live:
    """Server side: one request's stream and what it has received so far."""

    stream: RequestStream
    loop: asyncio.AbstractEventLoop
    prompt: str | None
    prompt_ids: list[int]
    ack: asyncio.Future
    outputs: dict[int, CompletionOutput] = field(default_factory=dict)
    prompt_logprobs: list | None = None

    def apply(self, delta: tuple) -> RequestOutput:
        """Fold a delta in; returns a new cumulative RequestOutput (never mutated later)."""
        rid, finished, num_cached, metrics, comps, plp = delta
        if plp is not None:
            self.prompt_logprobs = plp
        outs = []
        for idx, keep, tail, n, tok_tail, lp_tail, cum, finish, stop in comps:
            old = self.outputs.get(idx)
            text = old.text[:keep] + tail if old is not None else tail
            ids = old.token_ids[:n] + tok_tail if old is not None else list(tok_tail)
            if lp_tail is None:
                lps = None
            elif old is not None and old.logprobs is not None:
                lps = old.logprobs[:n] + lp_tail
            else:
                lps = list(lp_tail)
            o = CompletionOutput(idx, text, ids, cum, lps, finish, stop)
            self.outputs[idx] = o
            outs.append(o)
        return RequestOutput(
            rid,
            self.prompt,
            self.prompt_ids,
            outs,
            finished,
            prompt_logprobs=self.prompt_logprobs,
            num_cached_tokens=num_cached,
            metrics=metrics,
        )


# -- the server process's view of the checkpoint ------------------------------------------------


class FrontendView:
    """What the server's front end reads of the engine: config, HF config, tokenizer.

    Built from the checkpoint in the server process (no weights, no device); the context
    length comes from the core once it has sized the model.
    """

    is_multimodal = False
    prepares_remotely = True  # multimodal prompts are prepared by the core's front end

    def __init__(self, config):
        from jaxmm.runner.checkpoint import load_tokenizer, open_checkpoint

        self.config = config
        mc = config.model
        ck = open_checkpoint(mc.model, mc.load_format, mc.hf_overrides)
        self.checkpoint = ck
        self.hf_config = ck.hf_config
        self.tokenizer = None if mc.skip_tokenizer_init else load_tokenizer(ck, mc.tokenizer)
        self.max_model_len: int = 0  # set from the core's "ready" message
        self.mm_interface = None  # the model's declared multimodal interface, from "ready"
        self._chat_frontend = None

    def tokenize(self, prompt) -> tuple[str | None, list[int]]:
        return tokenize_prompt(prompt, self.tokenizer)

    def set_mm_interface(self, interface) -> None:
        self.mm_interface = interface
        self.is_multimodal = interface is not None

    def mm_frontend(self):
        """What chat rendering needs of the front end (the prompts go to the core)."""
        if self.mm_interface is None:
            raise ValueError("this is a text-only model: it takes no multi_modal_data")
        if self._chat_frontend is None:
            from jaxmm.multimodal.interface import ChatFrontend

            self._chat_frontend = ChatFrontend(
                self.mm_interface, self.tokenizer, self.config.multimodal
            )
        return self._chat_frontend


def is_multimodal_checkpoint(model: str, load_format: str = "auto") -> bool:
    """Whether the checkpoint's architecture takes images/video/audio (reads the config only)."""
    from jaxmm.models.registry import model_class
    from jaxmm.runner.checkpoint import open_checkpoint

    return bool(
        getattr(model_class(open_checkpoint(model, load_format).hf_config), "is_multimodal", False)
    )


# -- the server side ----------------------------------------------------------------------------


class ProcessEngine(EngineView):
    """An EngineClient whose LLMEngine runs in a spawned process (see the module docstring).

    `ProcessEngine(config)` returns once the core has built the engine (and compiled, when
    `config.warmup` is on); a core that fails to start raises RuntimeError with its reason.
    """

    def __init__(
        self,
        config,
        *,
        startup_timeout: float | None = None,
        env: dict[str, str] | None = None,
        name: str = "jaxmm-engine-core",
    ):
        """`env`: variables set in the core before JAX starts there (a data-parallel
        replica's devices, `jaxmm.engine.data_parallel.replica_env`)."""
        ctx = multiprocessing.get_context("spawn")
        cmd_recv, self._cmd_send = ctx.Pipe(duplex=False)
        self._out_recv, out_send = ctx.Pipe(duplex=False)
        level = logging.getLogger("jaxmm").getEffectiveLevel()
        self._proc = ctx.Process(
            target=_core_main,
            args=(config, cmd_recv, out_send, level, env),
            name=name,
            daemon=True,
        )
        self._proc.start()
        # only the core holds these ends now: its exit shows here as end-of-file
        cmd_recv.close()
        out_send.close()
        try:
            # the front end's share of start-up runs while the core loads and compiles
            self.engine = FrontendView(config)
            info = self._wait_ready(startup_timeout)
        except BaseException:
            self._kill()
            raise
        self.engine.max_model_len = info["max_model_len"]
        self.engine.set_mm_interface(info.get("mm_interface"))
        self._stats: dict = dict(info["stats"])
        self._live: dict[str, _Live] = {}
        self._calls: dict[int, concurrent.futures.Future] = {}
        self._call_ids = itertools.count()
        self._dead: BaseException | None = None
        self._closing = False
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        quiet_gc()
        self._sender = threading.Thread(target=self._send_loop, name="jaxmm-core-send", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="jaxmm-core-read", daemon=True)
        self._sender.start()
        self._reader.start()

    def _wait_ready(self, timeout: float | None) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            if self._out_recv.poll(wait):
                try:
                    msg = self._out_recv.recv()
                except EOFError:
                    raise RuntimeError(
                        f"the engine process exited while starting (exit code "
                        f"{self._proc.exitcode}); see its log above"
                    ) from None
                if msg[0] == "ready":
                    return msg[1]
                if msg[0] == "startup_failed":
                    raise RuntimeError(f"the engine process failed to start: {msg[1]}")
            elif not self._proc.is_alive():
                raise RuntimeError(
                    f"the engine process exited while starting (exit code {self._proc.exitcode})"
                )
            if deadline is not None and time.monotonic() >= deadline:
                raise RuntimeError("the engine process did not start in time")

    # -- what the server reads ------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self._dead is None and not self._closing and self._proc.is_alive()

    def get_stats(self) -> dict:
        return dict(self._stats)

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    # -- requests -------------------------------------------------------------------------------
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
        from jaxmm.multimodal.interface import PendingPrompt

        pending = mm if isinstance(mm, PendingPrompt) else None
        if mm is not None and pending is None:
            raise ValueError("prompts with media reach this engine as PendingPrompt")
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        if request_id in self._live:
            raise ValueError(f"request id {request_id!r} is already running")
        if prompt_ids is None and pending is None:
            prompt, prompt_ids = self.engine.tokenize(prompt)
        loop = asyncio.get_running_loop()
        stream = RequestStream(request_id, self)
        ack = loop.create_future()
        live = _Live(stream, loop, prompt, list(prompt_ids or ()), ack)
        self._live[request_id] = live
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        if pending is not None:
            self._commands.put(("prepare", request_id, pending, params, arrival))
        else:
            self._commands.put(("add", request_id, prompt, params, list(prompt_ids), arrival))
        try:
            await ack
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        except BaseException:
            self._live.pop(request_id, None)
            raise
        stream.prompt, stream.prompt_token_ids = live.prompt, live.prompt_ids
        return stream

    def abort(self, request_id: str | list[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            self._live.pop(rid, None)
        self._commands.put(("abort", ids))

    def call(self, fn, *args, timeout: float | None = None) -> Any:
        """Run `fn(engine, *args)` in the core between two steps and return its result.

        `fn` must be a module-level function (it is pickled by name). For tests and
        benchmarks: the core does nothing else while `fn` runs.
        """
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        cid = next(self._call_ids)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._calls[cid] = fut
        self._commands.put(("call", cid, fn, args))
        return fut.result(timeout)

    # -- lifecycle --------------------------------------------------------------------------------
    def shutdown(self, timeout: float = 10.0) -> None:
        if self._closing:
            return
        self._closing = True
        self._commands.put(("stop",))
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._kill()
        self._reader.join(timeout)
        self._fail_all(EngineDeadError("the engine was shut down"))

    def _kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)

    # -- the threads ----------------------------------------------------------------------------
    def _send_loop(self) -> None:
        while True:
            cmd = self._commands.get()
            try:
                self._cmd_send.send(cmd)
            except (OSError, ValueError):  # the core is gone; the reader reports it
                return
            if cmd[0] == "stop":
                return

    def _read_loop(self) -> None:
        conn = self._out_recv
        try:
            while True:
                msgs = [conn.recv()]
                while conn.poll(0):  # behind: take what is waiting, fold consecutive steps
                    msgs.append(conn.recv())
                for msg in _coalesce(msgs):
                    self._on_message(msg)
        except (EOFError, OSError):
            pass
        except BaseException as e:  # a bug here: nobody would ever hear from the core again
            logger.exception("reading the engine's messages failed")
            self._dead = e
        if not self._closing:
            code = self._proc.exitcode if not self._proc.is_alive() else None
            logger.error("the engine process exited (exit code %s)", code)
            self._dead = self._dead or EngineDeadError("the engine process exited")
        self._fail_all(EngineDeadError("the engine stopped"))

    def _on_message(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "out":
            _, deltas, stats = msg
            self._stats = stats
            by_loop: dict[asyncio.AbstractEventLoop, list] = {}
            for delta in deltas:
                live = self._live.get(delta[0])
                if live is None:  # aborted meanwhile
                    continue
                out = live.apply(delta)
                if out.finished:
                    self._live.pop(delta[0], None)
                by_loop.setdefault(live.loop, []).append((live.stream, out))
            for loop, items in by_loop.items():
                _call_soon(loop, _deliver, items)
        elif kind == "ack":
            _, rid, err, prepared = msg
            live = self._live.get(rid)
            if live is not None:
                if prepared is not None:  # the core prepared it: its text and token ids
                    live.prompt, live.prompt_ids = prepared
                if err is not None:
                    self._live.pop(rid, None)
                _call_soon(live.loop, _resolve, live.ack, err)
        elif kind == "stats":
            self._stats = msg[1]
        elif kind == "fail":
            exc = EngineError("the engine failed while running this request")
            for rid in msg[1]:
                live = self._live.pop(rid, None)
                if live is not None:
                    _call_soon(live.loop, _deliver, [(live.stream, exc)])
        elif kind == "result":
            _, cid, value, err = msg
            fut = self._calls.pop(cid, None)
            if fut is not None:
                if err is None:
                    fut.set_result(value)
                else:
                    fut.set_exception(err)

    def _fail_all(self, exc: BaseException) -> None:
        for rid in list(self._live):
            live = self._live.pop(rid, None)
            if live is None:
                continue
            if not live.ack.done():
                _call_soon(live.loop, _resolve, live.ack, exc)
            _call_soon(live.loop, _deliver, [(live.stream, exc)])
        for cid in list(self._calls):
            fut = self._calls.pop(cid, None)
            if fut is not None and not fut.done():
                fut.set_exception(exc)


# -- the core process ---------------------------------------------------------------------------


def _core_main(config, commands, out, log_level: int, env: dict | None = None) -> None:
    """The core process: build the engine, then serve commands until "stop" or until the
    server process goes away (its end of the command pipe closes)."""
    os.environ.update(env or {})  # before JAX reads it: nothing here has started a backend
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s [core]: %(message)s")
    sender = _CoreSender(out)
    try:
        from jaxmm.distributed import build_engine

        engine = build_engine(config)  # multi-host: the leader, publishing each step
    except BaseException as e:
        logger.exception("the engine failed to start")
        sender.put(("startup_failed", f"{type(e).__name__}: {e}"))
        sender.close()
        return
    info = {"max_model_len": engine.max_model_len, "stats": engine.get_stats()}
    if engine.is_multimodal:
        from jaxmm.multimodal.interface import DeclaredInterface

        info["mm_interface"] = DeclaredInterface.of(engine.runner.model_obj, engine.tokenizer)
    sender.put(("ready", info))
    quiet_gc()
    try:
        _CoreLoop(engine, commands, sender).run()
    except BaseException:
        logger.exception("the engine loop died")
    finally:
        from jaxmm.distributed import stop_followers

        stop_followers(engine)  # multi-host: the followers leave their loops too
        sender.close()


class _CoreSender:
    """Pickles and writes the core's messages on a thread of its own, in order."""

    def __init__(self, conn):
        self._conn = conn
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="jaxmm-core-out", daemon=True)
        self._thread.start()

    def put(self, msg: tuple) -> None:
        self._queue.put(msg)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(10)

    def _run(self) -> None:
        while True:
            msgs = [self._queue.get()]
            while True:  # a backlog (the server reads slower than steps come): send it merged
                try:
                    msgs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for msg in _coalesce(msgs):
                if msg is None:
                    return
                try:
                    self._conn.send(msg)
                except (OSError, ValueError):  # the server process is gone
                    return


def _coalesce(msgs: list) -> list:
    """Messages in order, each run of consecutive "out"/"stats" messages folded into one."""
    out: list = []
    for msg in msgs:
        prev = out[-1] if out else None
        if msg is not None and prev is not None and prev[0] in ("out", "stats"):
            if msg[0] == "out":
                deltas = merge_deltas(prev[1], msg[1]) if prev[0] == "out" else msg[1]
                out[-1] = ("out", deltas, msg[2])
                continue
            if msg[0] == "stats":
                out[-1] = (prev[0], prev[1], msg[1]) if prev[0] == "out" else msg
                continue
        out.append(msg)
    return out


class _CoreLoop:
    def __init__(self, engine, commands, sender: _CoreSender):
        self.engine = engine
        self.commands = commands
        self.sender = sender
        self.live: set[str] = set()
        self.deltas = DeltaEncoder()
        # multimodal prompts being prepared by the front end, on threads beside the loop
        self.preparing: set[str] = set()
        self.prepared: queue.SimpleQueue = queue.SimpleQueue()
        # with media worker processes, a thread waits on each: enough to keep them busy
        from jaxmm.multimodal.workers import num_workers

        threads = max(PREPARE_THREADS, 2 * num_workers(engine.config.multimodal))
        self.pool = concurrent.futures.ThreadPoolExecutor(
            threads, thread_name_prefix="jaxmm-prepare"
        )

    def run(self) -> None:
        engine = self.engine
        try:
            self._run(engine)
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, engine) -> None:
        while True:
            busy = engine.has_unfinished_requests()
            try:
                cmds = self._read(block=not busy, timeout=0.002 if self.preparing else 1.0)
            except (EOFError, OSError):  # the server process went away
                return
            for cmd in cmds:
                if cmd[0] == "stop":
                    return
                self._handle(cmd)
            added = self._add_prepared()
            if engine.has_unfinished_requests():
                self._step()
            elif cmds or added:
                self.sender.put(("stats", engine.get_stats()))

    def _read(self, block: bool, timeout: float = 1.0) -> list:
        cmds = []
        if block and not self.commands.poll(timeout):
            return cmds
        while self.commands.poll(0):
            cmds.append(self.commands.recv())
        return cmds

    def _handle(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            _, rid, prompt, params, prompt_ids, arrival = cmd
            try:
                self.engine.add_request(rid, prompt, params, arrival, prompt_ids=prompt_ids)
            except Exception as e:  # bad input: this request only
                self.sender.put(("ack", rid, _portable(e), None))
                return
            self.live.add(rid)
            self.sender.put(("ack", rid, None, None))
        elif kind == "prepare":
            _, rid, pending, params, arrival = cmd
            self.preparing.add(rid)
            fut = self.pool.submit(pending.prepare, self.engine)
            fut.add_done_callback(lambda f: self.prepared.put((rid, params, arrival, f)))
        elif kind == "abort":
            self.preparing.difference_update(cmd[1])
            ids = [rid for rid in cmd[1] if rid in self.live]
            if ids:
                self.engine.abort_request(ids)
                self.live.difference_update(ids)
                self.deltas.forget(ids)
        elif kind == "call":
            _, cid, fn, args = cmd
            try:
                value, err = fn(self.engine, *args), None
            except Exception as e:
                value, err = None, RuntimeError(f"{type(e).__name__}: {e}")
            self.sender.put(("result", cid, value, err))

    def _add_prepared(self) -> int:
        """Queue the requests whose prompts the front end has prepared since the last look."""
        n = 0
        while True:
            try:
                rid, params, arrival, fut = self.prepared.get_nowait()
            except queue.Empty:
                return n
            if rid not in self.preparing:  # aborted while it was prepared
                continue
            self.preparing.discard(rid)
            n += 1
            try:
                text, ids, mm = fut.result()
                self.engine.add_request(rid, text, params, arrival, prompt_ids=list(ids), mm=mm)
            except Exception as e:  # bad input: this request only
                self.sender.put(("ack", rid, _portable(e), None))
                continue
            self.live.add(rid)
            self.sender.put(("ack", rid, None, (text, list(ids))))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            logger.exception(
                "engine step failed; dropping the %d requests in flight", len(self.live)
            )
            failed = sorted(self.live)
            try:
                self.engine.abort_request(failed)
            except Exception:
                logger.exception("abort after a failed step failed too")
            self.live.clear()
            self.deltas.forget(failed)
            self.sender.put(("fail", failed))
            return
        deltas = []
        for out in outputs:
            if out.request_id not in self.live:  # aborted meanwhile
                continue
            if out.finished:
                self.live.discard(out.request_id)
            deltas.append(self.deltas.encode(out))
        self.sender.put(("out", deltas, self.engine.get_stats()))
