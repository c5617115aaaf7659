"""What the generation endpoints share: server state, sampling params from a request, prompt
preparation in the thread pool, submitting prompts, merging their streams, streaming deltas
and cancelling on disconnect.

The life of a generation request (chat or completions):
1. Parse the body (`protocol.parse_request`), check the model name (404) and build the
   SamplingParams (400 naming the field).
2. Prepare the prompt in the thread pool: chat template, tokenization, media fetch and
   processing. These block, so they never run on the event loop.
3. `submit`: one engine request per prompt; errors (prompt too long, ...) are raised here,
   before any response is started, so they become a 4xx JSON error even for a stream.
4. Read the cumulative outputs (`merge`), turning them into deltas (`DeltaTracker`) for a
   stream or into one response. A client that goes away cancels the reading task, and
   leaving the stream aborts the engine request, which frees its KV pages.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from starlette.responses import StreamingResponse

from jaxmm.engine.async_engine import EngineClient, RequestStream
from jaxmm.outputs import CompletionOutput, Logprob, RequestOutput
from jaxmm.sampling_params import SamplingParams, StructuredOutputsParams
from jaxmm.server.errors import APIError, from_exception
from jaxmm.server.metrics import RequestTracker, ServerMetrics


@dataclass
class ServerState:
    client: EngineClient
    served_model_names: list[str]
    model_path: str
    metrics: ServerMetrics
    pool: ThreadPoolExecutor
    chat_template: str | None = None
    trust_request_chat_template: bool = False
    response_role: str = "assistant"  # --response-role
    # SamplingParams values for fields a request leaves unset (--generation-config)
    default_sampling_params: dict = field(default_factory=dict)
    # tool calls and reasoning (--tool-call-parser, --enable-auto-tool-choice,
    # --reasoning-parser): chat_output.py
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False
    reasoning_parser: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def default_model(self) -> str:
        return self.served_model_names[0]


def get_state(request: Request) -> ServerState:
    return request.app.state.jaxmm


def _clip(text: str, limit: int = 100) -> str:
    """A client's string, cut short enough to quote back in an error message."""
    return text if len(text) <= limit else text[:limit] + "..."


def check_model(state: ServerState, name: str | None) -> str:
    """The served name a request addresses; 404 when the server does not serve it."""
    if not name:
        return state.default_model
    if name not in state.served_model_names:
        raise APIError(
            404,
            f"the model {_clip(name)!r} does not exist; this server serves "
            f"{', '.join(repr(n) for n in state.served_model_names)}",
            type="NotFoundError",
            param="model",
            code="model_not_found",
        )
    return name


async def run_blocking(state: ServerState, fn: Callable, *args, **kwargs) -> Any:
    """Run blocking front-end work (tokenizer, templates, media) in the server's pool."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(state.pool, functools.partial(fn, *args, **kwargs))


# -- sampling params --------------------------------------------------------------------------


def build_sampling_params(
    req,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    defaults: dict | None = None,
    prompt_logprobs: int | None = None,
    structured_outputs: StructuredOutputsParams | None = None,
) -> SamplingParams:
    """The request's SamplingParams; `defaults` fill what the request leaves unset."""
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of other than n is not supported", param="best_of")
    kwargs: dict[str, Any] = {
        "n": req.n,
        "max_tokens": max_tokens,
        "logprobs": logprobs,
        "stop": req.stop,
        "stop_token_ids": req.stop_token_ids,
        "ignore_eos": req.ignore_eos,
        "min_tokens": req.min_tokens,
        "skip_special_tokens": req.skip_special_tokens,
        "include_stop_str_in_output": req.include_stop_str_in_output,
        "spaces_between_special_tokens": req.spaces_between_special_tokens,
        "seed": req.seed,
        "logit_bias": req.logit_bias or None,
        "prompt_logprobs": req.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
        "structured_outputs": structured_outputs,
    }
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
    ):
        value = getattr(req, name)
        if value is not None:  # unset: the server's default, else SamplingParams'
            kwargs[name] = value
    for name, value in (defaults or {}).items():
        if kwargs.get(name) is None:
            kwargs[name] = value
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as e:
        raise from_exception(e) from None


def check_context(num_prompt_tokens: int, params: SamplingParams, max_model_len: int) -> None:
    """vLLM's rule: the prompt plus max_tokens must fit the model's context."""
    if num_prompt_tokens > max_model_len:
        raise APIError(
            400,
            f"this model's maximum context length is {max_model_len} tokens, but the prompt "
            f"is {num_prompt_tokens} tokens long; shorten the prompt",
            param="messages",
            code="context_length_exceeded",
        )
    if params.max_tokens is not None and num_prompt_tokens + params.max_tokens > max_model_len:
        raise APIError(
            400,
            f"this model's maximum context length is {max_model_len} tokens; the prompt is "
            f"{num_prompt_tokens} tokens and max_tokens is {params.max_tokens}, "
            f"{num_prompt_tokens + params.max_tokens} in all; lower max_tokens or shorten "
            "the prompt",
            param="max_tokens",
            code="context_length_exceeded",
        )


# -- prompts ----------------------------------------------------------------------------------


@dataclass
class Prompt:
    text: str | None
    token_ids: list[int]
    mm: Any = None


def prepare_prompt(engine: Any, prompt: str | dict) -> Prompt:
    """Blocking: a text/token-id/multimodal prompt -> token ids (+ multimodal inputs).

    With the engine in a process of its own, a multimodal prompt is prepared there (its
    front end decodes, processes and hashes the media beside the engine): it travels as a
    `PendingPrompt`, and its token ids arrive with the engine's acknowledgement.
    """
    if isinstance(prompt, dict) and prompt.get("multi_modal_data"):
        from jaxmm.multimodal.interface import PendingPrompt

        pending = PendingPrompt("multimodal", (prompt,))
        if getattr(engine, "prepares_remotely", False):
            text = prompt.get("prompt")
            return Prompt(text if isinstance(text, str) else None, [], pending)
        text, ids, mm = pending.prepare(engine)
        return Prompt(text, list(ids), mm)
    text, ids = engine.tokenize(prompt)
    return Prompt(text, list(ids))


@dataclass
class Submitted:
    """The engine requests of one API request (one per prompt) and their trackers."""

    request_id: str
    prompts: list[Prompt]
    streams: list[RequestStream]
    trackers: list[RequestTracker]
    params: SamplingParams

    def abort(self) -> None:
        for stream, tracker in zip(self.streams, self.trackers, strict=True):
            if not stream.finished:
                stream.abort()
                tracker.aborted(self.params.n)


async def submit(
    state: ServerState,
    request_id: str,
    prompts: list[Prompt],
    params: SamplingParams,
    arrival: float,
) -> Submitted:
    """Queue one engine request per prompt; all or nothing."""
    from jaxmm.multimodal.interface import PendingPrompt

    for p in prompts:
        if not isinstance(p.mm, PendingPrompt):  # a pending one is checked once prepared
            check_context(len(p.token_ids), params, state.client.max_model_len)
    sub = Submitted(request_id, prompts, [], [], params)
    try:
        for i, p in enumerate(prompts):
            rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
            stream = await state.client.add_request(
                rid, p.text, params, prompt_ids=p.token_ids, mm=p.mm, arrival_time=arrival
            )
            if isinstance(p.mm, PendingPrompt):  # prepared by the engine: its ids came back
                p.text, p.token_ids = stream.prompt, list(stream.prompt_token_ids)
                try:
                    check_context(len(p.token_ids), params, state.client.max_model_len)
                except BaseException:
                    stream.abort()
                    raise
            sub.streams.append(stream)
            sub.trackers.append(state.metrics.track(arrival, len(p.token_ids)))
    except Exception as e:
        sub.abort()
        raise from_exception(e) from None
    except BaseException:
        sub.abort()
        raise
    return sub


async def merge(sub: Submitted) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, cumulative output) from all the request's streams as they come."""
    if len(sub.streams) == 1:
        async for out in sub.streams[0]:
            sub.trackers[0].observe(out)
            yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                q.put_nowait((i, out))
        except Exception as e:
            q.put_nowait((i, e))
        q.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(sub.streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await q.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                sub.trackers[i].observe(item)
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def collect(sub: Submitted) -> list[RequestOutput]:
    """Wait for every prompt's final output (non-streaming)."""
    final: list[RequestOutput | None] = [None] * len(sub.streams)
    try:
        async for i, out in merge(sub):
            final[i] = out
    except Exception as e:
        raise from_exception(e) from None
    finally:
        sub.abort()  # no-op for finished requests; a cancelled (disconnected) one stops here
    return final  # type: ignore[return-value]


# -- deltas for streaming ---------------------------------------------------------------------


class DeltaTracker:
    """Per choice: how much of the cumulative text/tokens/logprobs was already sent.

    While stop strings are set, the last `len(longest stop) - 1` characters are held back
    until the choice finishes: the engine may still cut the text at a stop string that
    began there, and sent text cannot be taken back.
    """

    def __init__(self, params: SamplingParams):
        self.holdback = max((len(s) for s in params.stop_strings), default=1) - 1
        self.sent_text: dict[int, int] = {}
        self.sent_tokens: dict[int, int] = {}
        self.done: set[int] = set()

    def delta(self, key: int, o: CompletionOutput) -> Delta | None:
        """What is new in `o` since the last call; None once its final delta was given."""
        if key in self.done:
            return None
        finished = o.finish_reason is not None
        if finished:
            self.done.add(key)
        start = self.sent_text.get(key, 0)
        end = len(o.text) if finished else max(start, len(o.text) - self.holdback)
        self.sent_text[key] = max(start, end)
        start_tok = self.sent_tokens.get(key, 0)
        self.sent_tokens[key] = len(o.token_ids)
        return Delta(
            text=o.text[start:end],
            token_ids=o.token_ids[start_tok:],
            logprobs=o.logprobs[start_tok:] if o.logprobs is not None else None,
            finish_reason=o.finish_reason,
            stop_reason=o.stop_reason,
        )


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    stop_reason: int | str | None

    @property
    def empty(self) -> bool:
        return not self.text and not self.token_ids and self.finish_reason is None


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class AbortingStreamingResponse(StreamingResponse):
    """A StreamingResponse that aborts its engine requests however it ends.

    The body generator's own `finally` does not run when the client goes away before the
    generator was first entered; this does.
    """

    def __init__(self, content, sub: Submitted, **kwargs):
        super().__init__(content, media_type="text/event-stream", **kwargs)
        self.sub = sub

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.sub.abort()


async def stream_events(
    sub: Submitted,
    make_events: Callable[[int, RequestOutput], list[dict]],
    head: Callable[[], list[dict]] = list,
    tail: Callable[[], list[dict]] = list,
) -> AsyncIterator[str]:
    """SSE text: `head()`'s events, the events each output makes, `tail()`'s, then [DONE].
    An engine failure mid-stream becomes an error event (the status line is already sent)."""
    try:
        for event in head():
            yield sse(event)
        async for i, out in merge(sub):
            for event in make_events(i, out):
                yield sse(event)
        for event in tail():
            yield sse(event)
    except Exception as e:
        yield from_exception(e).sse()
    finally:
        sub.abort()
    yield SSE_DONE


async def cancel_on_disconnect(request: Request, work: Awaitable) -> Any:
    """Run `work`, cancelling it if the client disconnects first (non-streaming responses;
    the body has been read by then, so the next ASGI message is the disconnect)."""
    task = asyncio.ensure_future(work)

    async def wait_disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        # nobody reads this answer; it only shows in the access log and the metrics
        raise APIError(499, "the client closed the request")
    return task.result()


# -- logprobs -------------------------------------------------------------------------------


def token_text(token_id: int, lp: Logprob) -> str:
    return lp.decoded_token if lp.decoded_token is not None else f"token_id:{token_id}"


def finite(logprob: float) -> float:
    """JSON has no -inf: clamp like vLLM does."""
    return max(logprob, -9999.0)


def prompt_logprobs_json(entries: list[dict[int, Logprob] | None] | None) -> list | None:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {id: logprob info}."""
    if entries is None:
        return None
    return [
        None
        if e is None
        else {
            str(t): {
                "logprob": finite(lp.logprob),
                "rank": lp.rank,
                "decoded_token": lp.decoded_token,
            }
            for t, lp in e.items()
        }
        for e in entries
    ]


def top_entries(entry: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The k most likely tokens of one position, most likely first."""
    ranked = [(t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= k]
    ranked.sort(key=lambda x: x[1].rank)
    return ranked[:k]
