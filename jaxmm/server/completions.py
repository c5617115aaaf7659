"""POST /v1/completions: OpenAI (legacy) text completions, plain or streamed.

`prompt` is a string, a list of strings, a list of token ids or a list of those; each
prompt is one engine request with `n` completions, and choice `i * n + j` is completion j
of prompt i. `echo` prepends the prompt text; with `logprobs` the prompt's tokens lead the
logprobs too (computed as prompt logprobs; the first token has none). `response_format` and
`structured_outputs` constrain the text as in chat. `suffix` (fill-in-the-middle) is
refused.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from jaxmm.outputs import Logprob, RequestOutput
from jaxmm.server import structured
from jaxmm.server.errors import APIError, api_errors
from jaxmm.server.logprobs import finite, prompt_logprobs_json, token_text, top_entries
from jaxmm.server.protocol import CompletionRequest, now, parse_request, random_id, usage
from jaxmm.server.state import ServerState, check_model, get_state, run_blocking
from jaxmm.server.streaming import (
    AbortingStreamingResponse,
    DeltaTracker,
    cancel_on_disconnect,
    stream_events,
)
from jaxmm.server.submit import Prompt, build_sampling_params, collect, prepare_prompt, submit

router = APIRouter()


def _split_prompts(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


def _prepare(state: ServerState, prompts: list[str | list[int]], echo: bool) -> list[Prompt]:
    """Blocking: tokenize text prompts; for echo, decode token-id prompts to text."""
    engine = state.client.engine
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(prepare_prompt(engine, p))
            continue
        prepared = prepare_prompt(engine, {"prompt_token_ids": p})
        if echo and prepared.text is None and engine.tokenizer is not None:
            prepared.text = engine.tokenizer.decode(p)
        out.append(prepared)
    return out


class _LogprobsFormatter:
    """The completions API's logprobs shape; text offsets run on across stream chunks."""

    def __init__(self, k: int, tokenizer=None):
        self.k = k
        self.tokenizer = tokenizer
        self.offsets: dict[int, int] = {}

    def __call__(
        self, key: int, token_ids: list[int], entries: list[dict[int, Logprob] | None]
    ) -> dict:
        tokens, token_lps, tops, offsets = [], [], [], []
        offset = self.offsets.get(key, 0)
        for tid, entry in zip(token_ids, entries, strict=True):
            if entry is None:  # an echoed prompt's first token: nothing before it
                text = self.tokenizer.decode([tid]) if self.tokenizer else f"token_id:{tid}"
                tokens.append(text)
                token_lps.append(None)
                tops.append(None)
                offsets.append(offset)
                offset += len(text)
                continue
            lp = entry[tid]
            text = token_text(tid, lp)
            tokens.append(text)
            token_lps.append(finite(lp.logprob))
            tops.append(
                {token_text(t, x): finite(x.logprob) for t, x in top_entries(entry, self.k)}
            )
            offsets.append(offset)
            offset += len(text)
        self.offsets[key] = offset
        return {
            "tokens": tokens,
            "token_logprobs": token_lps,
            "top_logprobs": tops,
            "text_offset": offsets,
        }


@router.post("/v1/completions")
@api_errors
async def create_completion(request: Request):
    arrival = time.monotonic()
    state = get_state(request)
    req = parse_request(CompletionRequest, await request.body())
    model = check_model(state, req.model)
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    echo_lps = req.echo and req.logprobs is not None
    so, so_field = structured.from_request(req)
    params = build_sampling_params(
        req,
        max_tokens=req.max_tokens,
        logprobs=req.logprobs,
        defaults=state.default_sampling_params,
        # echo with logprobs: the prompt's logprobs lead the output's
        prompt_logprobs=max(req.logprobs, req.prompt_logprobs or 0) if echo_lps else None,
        structured_outputs=so,
    )
    await structured.check(state, so, so_field)
    prompts = await run_blocking(state, _prepare, state, _split_prompts(req.prompt), req.echo)
    request_id = random_id("cmpl")
    sub = await submit(state, request_id, prompts, params, arrival)
    created = now()
    n = params.n
    fmt = _LogprobsFormatter(req.logprobs or 0, state.client.engine.tokenizer)
    with_plp = req.prompt_logprobs is not None

    if not req.stream:
        finals = await cancel_on_disconnect(request, collect(sub))
        return JSONResponse(
            _response(finals, prompts, request_id, model, created, n, req.echo, fmt, with_plp)
        )

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous = include_usage and req.stream_options.continuous_usage_stats
    deltas = DeltaTracker(params)
    n_prompt = sum(len(p.token_ids) for p in prompts)
    generated = {"n": 0}

    def chunk(choices: list[dict]) -> dict:
        c = {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if include_usage:
            c["usage"] = usage(n_prompt, generated["n"]) if continuous else None
        return c

    echoed: set[int] = set()

    def echo_chunks(i: int, out: RequestOutput) -> list[dict]:
        """With logprobs the echo waits for the prompt's logprobs (the first output)."""
        if not echo_lps or i in echoed:
            return []
        echoed.add(i)
        plp = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
        return [
            chunk(
                [
                    _choice(
                        i * n + j,
                        prompts[i].text or "",
                        fmt(i * n + j, out.prompt_token_ids, plp),
                        None,
                        None,
                    )
                ]
            )
            for j in range(n)
        ]

    def head() -> list[dict]:
        if not req.echo or echo_lps:
            return []
        return [
            chunk([_choice(i * n + j, p.text or "", None, None, None)])
            for i, p in enumerate(prompts)
            for j in range(n)
        ]

    def events(i: int, out: RequestOutput) -> list[dict]:
        result = echo_chunks(i, out)
        for o in out.outputs:
            key = i * n + o.index
            d = deltas.delta(key, o)
            if d is None or d.empty:
                continue
            generated["n"] += len(d.token_ids)
            if not d.text and d.finish_reason is None and d.logprobs is None:
                continue
            lps = fmt(key, d.token_ids, d.logprobs) if d.logprobs is not None else None
            result.append(chunk([_choice(key, d.text, lps, d.finish_reason, d.stop_reason)]))
        return result

    def tail() -> list[dict]:
        if not include_usage:
            return []
        c = chunk([])
        c["usage"] = usage(n_prompt, generated["n"])
        return [c]

    return AbortingStreamingResponse(stream_events(sub, events, head, tail), sub)


def _choice(index: int, text: str, logprobs, finish_reason, stop_reason) -> dict:
    return {
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
    }


def _response(
    finals: list[RequestOutput],
    prompts: list[Prompt],
    request_id: str,
    model: str,
    created: int,
    n: int,
    echo: bool,
    fmt: _LogprobsFormatter,
    with_plp: bool = False,
) -> dict:
    choices = []
    n_prompt = n_gen = n_cached = 0
    for i, (out, prompt) in enumerate(zip(finals, prompts, strict=True)):
        n_prompt += len(out.prompt_token_ids)
        n_cached += out.num_cached_tokens
        for o in sorted(out.outputs, key=lambda o: o.index):
            n_gen += len(o.token_ids)
            key = i * n + o.index
            text = (prompt.text or "") + o.text if echo else o.text
            lps = None
            if o.logprobs is not None:
                ids, entries = o.token_ids, o.logprobs
                if echo:  # the prompt's tokens first (its first token has no logprob)
                    plp = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
                    ids, entries = out.prompt_token_ids + ids, plp + entries
                lps = fmt(key, ids, entries)
            choice = _choice(key, text, lps, o.finish_reason, o.stop_reason)
            if with_plp:
                choice["prompt_logprobs"] = prompt_logprobs_json(out.prompt_logprobs)
            choices.append(choice)
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(n_prompt, n_gen, n_cached),
    }
