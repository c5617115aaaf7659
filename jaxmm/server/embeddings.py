"""POST /v1/embeddings: OpenAI embeddings from a pooling model (BertModel, ...).

1. Parse the body; `input` is a string, a list of strings, a list of token ids or a list of
   such lists (token ids are used as given: no special tokens are added). Or vLLM's chat
   form, `messages` (content parts with images, ...), for a vision-language model served
   with `--runner pooling`: rendered with the model's template (or `--chat-template`,
   or the request's `chat_template` where trusted), no generation prompt unless asked.
2. An engine without `supports_embeddings` (a generative model) gets a 400, as does a
   `dimensions` other than the model's own size (no Matryoshka truncation).
3. Tokenization and the forward run in the server's thread pool, never on the event loop;
   the engine's lock lets one forward run at a time.
4. The answer lists one vector per input, as floats or as base64 of little-endian float32
   (`encoding_format`; the official client asks for base64 by default), with
   `usage.prompt_tokens`.

`generation_refused` answers the generation routes with a 400 when the served model is a
pooling model; the app mounts it in front of the chat/completions routes.
"""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Request

from jaxmm.pooling import PoolingParams
from jaxmm.server.errors import APIError, api_errors
from jaxmm.server.protocol import EmbeddingRequest, now, parse_request, random_id
from jaxmm.server.state import check_model, get_state, run_blocking
from jaxmm.server.streaming import cancel_on_disconnect

router = APIRouter()
generation_refused = APIRouter()


def _split_input(value) -> list[str | list[int]]:
    if isinstance(value, str):
        return [value]
    if not value:
        raise APIError(400, "input must not be empty", param="input")
    if all(isinstance(t, int) for t in value):
        return [list(value)]
    return list(value)


def _embed(engine, inputs: list[str | list[int]], params: PoolingParams):
    """Blocking: tokenize and run the forward."""
    ids = [engine.tokenize(p if isinstance(p, str) else {"prompt_token_ids": p}) for p in inputs]
    return engine.embed(ids, [params] * len(ids))


def _embed_chat(engine, messages: list[dict], kwargs: dict, params: PoolingParams):
    """Blocking: render the conversation (media fetched and decoded), run the forward."""
    return engine.embed([engine.prepare_chat(messages, **kwargs)], [params])


def _chat_kwargs(req: EmbeddingRequest, state) -> dict:
    if not req.messages:
        raise APIError(400, "messages must not be empty", param="messages")
    if req.input is not None:
        raise APIError(400, "give either input or messages, not both", param="messages")
    if req.chat_template is not None and not state.trust_request_chat_template:
        raise APIError(
            400,
            "this server does not accept a chat_template in requests (start it with "
            "--trust-request-chat-template to allow that)",
            param="chat_template",
        )
    return {
        "chat_template": req.chat_template or state.chat_template,
        "add_generation_prompt": req.add_generation_prompt and not req.continue_final_message,
        "continue_final_message": req.continue_final_message,
        "chat_template_kwargs": req.chat_template_kwargs,
    }


def _encode(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


@router.post("/v1/embeddings")
@api_errors
async def create_embedding(request: Request):
    state = get_state(request)
    req = parse_request(EmbeddingRequest, await request.body())
    name = check_model(state, req.model)
    engine = state.client.engine
    if not getattr(engine, "supports_embeddings", False):
        raise APIError(
            400,
            "this model does not support embeddings (it is a generative model; serve a "
            "pooling/embedding model for /v1/embeddings)",
            param="model",
            code="model_not_supported",
        )
    if req.dimensions is not None and req.dimensions != engine.embedding_dim:
        raise APIError(
            400,
            f"dimensions={req.dimensions} is not supported: this model's embeddings have "
            f"{engine.embedding_dim} dimensions (no Matryoshka truncation)",
            param="dimensions",
        )
    if req.messages is not None:
        if not hasattr(engine, "prepare_chat"):
            raise APIError(
                400,
                "this embedding model takes text `input`; chat `messages` need a "
                "vision-language model served with --runner pooling",
                param="messages",
            )
        work = (_embed_chat, engine, req.messages, _chat_kwargs(req, state), PoolingParams())
    elif req.input is None:
        raise APIError(400, "input (or messages) is required", param="input")
    else:
        work = (_embed, engine, _split_input(req.input), PoolingParams())
    outs = await cancel_on_disconnect(request, run_blocking(state, *work))
    num_tokens = sum(len(o.prompt_token_ids) for o in outs)
    return {
        "id": random_id("embd"),
        "object": "list",
        "created": now(),
        "model": name,
        "data": [
            {
                "object": "embedding",
                "index": i,
                "embedding": _encode(o.outputs.embedding, req.encoding_format),
            }
            for i, o in enumerate(outs)
        ],
        "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens},
    }


@generation_refused.post("/v1/chat/completions")
@generation_refused.post("/v1/completions")
@api_errors
async def refuse_generation(request: Request):
    raise APIError(
        400,
        "this is an embedding model: it serves /v1/embeddings only, not text generation",
        param="model",
        code="model_not_supported",
    )
