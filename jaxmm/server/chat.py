"""POST /v1/chat/completions: OpenAI chat completions, plain or streamed (server-sent events).

The conversation goes through the model's chat template (or `--chat-template`) in the
thread pool; media parts go to the multimodal front end. `response_format` and vLLM's
`structured_outputs` constrain the output with a grammar (`structured.py`); the grammar is
compiled before the request reaches the engine, so a bad schema is a 400.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from jaxmm.outputs import CompletionOutput, Logprob, RequestOutput
from jaxmm.server import structured
from jaxmm.server.chat_output import ChatOutput
from jaxmm.server.errors import APIError, api_errors
from jaxmm.server.logprobs import finite, prompt_logprobs_json, token_text, top_entries
from jaxmm.server.protocol import ChatCompletionRequest, now, parse_request, random_id, usage
from jaxmm.server.state import ServerState, check_model, get_state, run_blocking
from jaxmm.server.streaming import (
    AbortingStreamingResponse,
    DeltaTracker,
    cancel_on_disconnect,
    stream_events,
)
from jaxmm.server.submit import Prompt, build_sampling_params, collect, prepare_prompt, submit
from jaxmm.server.tool_parsers import prepare_messages

router = APIRouter()


# the roles OpenAI's chat API accepts; any other is a 400 there too
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def _check_roles(messages: list[dict]) -> None:
    for i, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else None
        if role is not None and role not in CHAT_ROLES:  # no role at all: the front end says
            supported = ", ".join(repr(r) for r in CHAT_ROLES)
            raise APIError(
                400,
                f"invalid value {str(role)[:100]!r} for messages[{i}].role; supported values "
                f"are {supported}",
                param=f"messages.[{i}].role",
                code="invalid_value",
            )


def _check_supported(req: ChatCompletionRequest, state: ServerState) -> None:
    _check_roles(req.messages)
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
        raise APIError(400, "top_logprobs must be in [0, 20]", param="top_logprobs")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    if req.chat_template is not None and not state.trust_request_chat_template:
        raise APIError(
            400,
            "this server does not accept a chat_template in requests (start it with "
            "--trust-request-chat-template to allow that)",
            param="chat_template",
        )
    if req.continue_final_message and req.add_generation_prompt:
        # vLLM's rule: the two contradict; add_generation_prompt defaults to True
        req.add_generation_prompt = False


def _chat_prompt(state: ServerState, req: ChatCompletionRequest) -> Prompt:
    """Blocking: messages -> prompt (template, tokenization, media)."""
    from jaxmm.multimodal.chat import conversation_to_prompt

    engine = state.client.engine
    prompt = conversation_to_prompt(
        engine,
        prepare_messages(req.messages),
        chat_template=req.chat_template or state.chat_template,
        add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message,
        chat_template_kwargs=req.chat_template_kwargs,
        tools=req.tools,
        mm_processor_kwargs=req.mm_processor_kwargs,
    )
    if prompt.get("multi_modal_data"):
        return prepare_prompt(engine, prompt)
    return Prompt(prompt.get("prompt"), list(prompt["prompt_token_ids"]))


def chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], k: int) -> dict:
    content = []
    for tid, entry in zip(token_ids, entries, strict=True):
        lp = entry[tid]
        text = token_text(tid, lp)
        content.append(
            {
                "token": text,
                "logprob": finite(lp.logprob),
                "bytes": list(text.encode("utf-8")),
                "top_logprobs": [
                    {
                        "token": token_text(t, tlp),
                        "logprob": finite(tlp.logprob),
                        "bytes": list(token_text(t, tlp).encode("utf-8")),
                    }
                    for t, tlp in top_entries(entry, k)
                ],
            }
        )
    return {"content": content}


@router.post("/v1/chat/completions")
@api_errors
async def create_chat_completion(request: Request):
    arrival = time.monotonic()
    state = get_state(request)
    req = parse_request(ChatCompletionRequest, await request.body())
    model = check_model(state, req.model)
    _check_supported(req, state)
    max_tokens = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    shaper = ChatOutput(req, state)  # tool_choice and reasoning
    so, so_field = shaper.constrain(*structured.from_request(req))
    params = build_sampling_params(
        req,
        max_tokens=max_tokens,
        logprobs=logprobs,
        defaults=state.default_sampling_params,
        structured_outputs=so,
    )
    await structured.check(state, so, so_field)
    prompt = await run_blocking(state, _chat_prompt, state, req)
    request_id = random_id("chatcmpl")
    sub = await submit(state, request_id, [prompt], params, arrival)
    created = now()
    k = req.top_logprobs or 0

    if not req.stream:
        (out,) = await cancel_on_disconnect(request, collect(sub))
        return JSONResponse(
            _response(out, request_id, model, created, k, state.response_role, shaper)
        )

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous = include_usage and req.stream_options.continuous_usage_stats
    deltas = DeltaTracker(params)
    shaped = [shaper.stream() for _ in range(params.n)]
    n_prompt = len(prompt.token_ids)
    generated = {"n": 0}

    def chunk(choices: list[dict], usage_now: dict | None = None) -> dict:
        c = {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if include_usage:
            c["usage"] = usage_now
        return c

    def head() -> list[dict]:
        u = usage(n_prompt, 0) if continuous else None
        return [
            chunk(
                [
                    {
                        "index": i,
                        "delta": {"role": state.response_role, "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
                u,
            )
            for i in range(params.n)
        ]

    def events(_: int, out: RequestOutput) -> list[dict]:
        result = []
        for o in out.outputs:
            d = deltas.delta(o.index, o)
            if d is None or d.empty:
                continue
            generated["n"] += len(d.token_ids)
            stream = shaped[o.index]
            delta = stream.feed(d.text, d.finish_reason is not None)
            if not delta and d.finish_reason is None and d.logprobs is None:
                continue  # no text yet (a split character, or held back by a parser)
            choice = {
                "index": o.index,
                "delta": delta,
                "logprobs": chat_logprobs(d.token_ids, d.logprobs, k)
                if d.logprobs is not None
                else None,
                "finish_reason": stream.finish_reason(d.finish_reason),
            }
            if d.finish_reason is not None:
                choice["stop_reason"] = d.stop_reason
            result.append(chunk([choice], usage(n_prompt, generated["n"]) if continuous else None))
        return result

    def tail() -> list[dict]:
        if not include_usage:
            return []
        return [chunk([], usage(n_prompt, generated["n"]))]

    return AbortingStreamingResponse(stream_events(sub, events, head, tail), sub)


def _response(
    out: RequestOutput,
    request_id: str,
    model: str,
    created: int,
    k: int,
    role: str,
    shaper: ChatOutput,
) -> dict:
    outs = sorted(out.outputs, key=lambda o: o.index)
    choices = [_choice(o, k, role, shaper) for o in outs]
    n_gen = sum(len(o.token_ids) for o in out.outputs)
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(len(out.prompt_token_ids), n_gen, out.num_cached_tokens),
        "prompt_logprobs": prompt_logprobs_json(out.prompt_logprobs),
    }


def _choice(o: CompletionOutput, k: int, role: str, shaper: ChatOutput) -> dict:
    message, finish_reason = shaper.message(role, o.text, o.finish_reason)
    return {
        "index": o.index,
        "message": message,
        "logprobs": chat_logprobs(o.token_ids, o.logprobs, k) if o.logprobs is not None else None,
        "finish_reason": finish_reason,
        "stop_reason": o.stop_reason,
    }
