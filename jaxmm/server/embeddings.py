"""POST /v1/embeddings: validated and answered, but no served model pools yet.

The hook: when the engine gains a pooling runner, an engine that has one sets
`supports_embeddings = True` and provides `embed(prompt_ids) -> list[float]`; this endpoint
then tokenizes `input` like /v1/completions does and returns the OpenAI embedding list.
Until then every well-formed request gets a 400 that says so.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from jaxmm.server.errors import APIError, api_errors
from jaxmm.server.protocol import EmbeddingRequest, parse_request
from jaxmm.server.serving import check_model, get_state

router = APIRouter()


@router.post("/v1/embeddings")
@api_errors
async def create_embedding(request: Request):
    state = get_state(request)
    req = parse_request(EmbeddingRequest, await request.body())
    check_model(state, req.model)
    if not getattr(state.client.engine, "supports_embeddings", False):
        raise APIError(
            400,
            "this model does not support embeddings (it is a generative model; serve a "
            "pooling/embedding model for /v1/embeddings)",
            param="model",
            code="model_not_supported",
        )
    raise APIError(501, "embeddings are not implemented yet")
