"""From a parsed generation request to engine requests, and back to outputs.

The life of a generation request (chat or completions):
1. Parse the body (`protocol.parse_request`), check the model name (404) and build the
   SamplingParams (400 naming the field): `build_sampling_params`.
2. Prepare the prompt in the thread pool: chat template, tokenization, media fetch and
   processing (`prepare_prompt`). These block, so they never run on the event loop.
3. `submit`: one engine request per prompt; errors (prompt too long, ...) are raised here,
   before any response is started, so they become a 4xx JSON error even for a stream.
4. Read the cumulative outputs (`merge`, `collect`); a stream turns them into deltas
   (`streaming.py`). Leaving the stream aborts the engine request, which frees its KV pages.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from jaxmm.engine.async_engine import RequestStream
from jaxmm.outputs import RequestOutput
from jaxmm.sampling_params import SamplingParams, StructuredOutputsParams
from jaxmm.server.errors import APIError, from_exception
from jaxmm.server.metrics import RequestTracker
from jaxmm.server.state import ServerState


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
