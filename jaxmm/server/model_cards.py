"""GET /v1/models (and /v1/models/{name}): the names this server answers to."""

from __future__ import annotations

from fastapi import APIRouter, Request

from jaxmm.server.errors import api_errors
from jaxmm.server.state import ServerState, check_model, get_state

router = APIRouter()


def _card(state: ServerState, name: str) -> dict:
    return {
        "id": name,
        "object": "model",
        "created": state.created,
        "owned_by": "jaxmm",
        "root": state.model_path,
        "parent": None,
        "max_model_len": state.client.max_model_len,
    }


@router.get("/v1/models")
@api_errors
async def list_models(request: Request):
    state = get_state(request)
    return {"object": "list", "data": [_card(state, n) for n in state.served_model_names]}


@router.get("/v1/models/{name:path}")
@api_errors
async def retrieve_model(request: Request):
    state = get_state(request)
    return _card(state, check_model(state, request.path_params["name"]))
