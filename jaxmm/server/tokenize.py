"""POST /tokenize and /detokenize, in vLLM's shapes.

`/tokenize` takes either a plain `prompt` or chat `messages` (rendered through the chat
template exactly as /v1/chat/completions would, so a client can count a conversation's
tokens before sending it) and answers `{"tokens", "count", "max_model_len"}` (+ the token
strings on request). `/detokenize` turns token ids back into `{"prompt": text}`. Both run
the tokenizer in the server's thread pool, never on the event loop.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from jaxmm.server.errors import APIError, api_errors
from jaxmm.server.protocol import (
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    parse_request,
)
from jaxmm.server.state import ServerState, check_model, get_state, run_blocking

router = APIRouter()


def _tokenizer(state: ServerState):
    tok = state.client.engine.tokenizer
    if tok is None:
        raise APIError(400, "this server has no tokenizer (skip_tokenizer_init is on)")
    return tok


def _tokenize_chat(state: ServerState, req: TokenizeChatRequest) -> list[int]:
    """Blocking: messages -> the ids chat completions would feed the model."""
    from jaxmm.multimodal.chat import conversation_to_prompt

    prompt = conversation_to_prompt(
        state.client.engine,
        req.messages,
        chat_template=req.chat_template or state.chat_template,
        add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
        continue_final_message=req.continue_final_message,
        chat_template_kwargs=req.chat_template_kwargs,
        tools=req.tools,
    )
    ids = list(prompt["prompt_token_ids"])
    if req.add_special_tokens:
        # a template without BOS: add what the tokenizer would add to plain text
        tok = _tokenizer(state)
        ids = tok.build_inputs_with_special_tokens(ids)
    return ids


def _tokenize_text(state: ServerState, req: TokenizeCompletionRequest) -> list[int]:
    tok = _tokenizer(state)
    return list(tok(req.prompt, add_special_tokens=req.add_special_tokens).input_ids)


@router.post("/tokenize")
@api_errors
async def tokenize(request: Request):
    state = get_state(request)
    body = await request.body()
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        data = None  # parse_request reports the bad body
    is_chat = isinstance(data, dict) and "messages" in data
    if is_chat:
        req = parse_request(TokenizeChatRequest, body)
        check_model(state, req.model)
        if req.chat_template is not None and not state.trust_request_chat_template:
            raise APIError(
                400,
                "this server does not accept a chat_template in requests (start it with "
                "--trust-request-chat-template to allow that)",
                param="chat_template",
            )
        ids = await run_blocking(state, _tokenize_chat, state, req)
    else:
        req = parse_request(TokenizeCompletionRequest, body)
        check_model(state, req.model)
        ids = await run_blocking(state, _tokenize_text, state, req)
    out = {"count": len(ids), "max_model_len": state.client.max_model_len, "tokens": ids}
    if req.return_token_strs:
        tok = _tokenizer(state)
        out["token_strs"] = tok.convert_ids_to_tokens(ids)
    else:
        out["token_strs"] = None
    return JSONResponse(out)


def _vocab_limit(state: ServerState) -> int:
    tok = _tokenizer(state)
    cfg = state.client.hf_config
    cfg = getattr(cfg, "text_config", None) or cfg
    return max(len(tok), getattr(cfg, "vocab_size", 0) or 0)


@router.post("/detokenize")
@api_errors
async def detokenize(request: Request):
    state = get_state(request)
    req = parse_request(DetokenizeRequest, await request.body())
    check_model(state, req.model)
    limit = _vocab_limit(state)
    bad = next((t for t in req.tokens if not 0 <= t < limit), None)
    if bad is not None:
        raise APIError(
            400, f"token id {bad} is out of range (the vocabulary has {limit})", param="tokens"
        )
    text = await run_blocking(state, _tokenizer(state).decode, req.tokens)
    return JSONResponse({"prompt": text})
