"""Streaming: cumulative outputs -> deltas, server-sent events, aborting the engine request
when the stream ends early, and cancelling non-streaming work when the client disconnects."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.responses import StreamingResponse

from jaxmm.outputs import CompletionOutput, Logprob, RequestOutput
from jaxmm.sampling_params import SamplingParams
from jaxmm.server.errors import APIError, from_exception
from jaxmm.server.submit import Submitted, merge


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
