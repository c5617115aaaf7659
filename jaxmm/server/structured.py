"""Structured outputs in requests: `response_format`, vLLM's `structured_outputs` (and its
older `guided_*` fields) -> `StructuredOutputsParams`, checked before the engine sees them.

The grammar is compiled in the server's thread pool under llguidance's fuel and size limits
and a wall-clock timeout, so a huge or pathological schema is a 400 in bounded time and
never reaches (or stalls) the engine. The engine compiles it again from its own cache.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from jaxmm.sampling_params import StructuredOutputsParams
from jaxmm.server.errors import APIError

COMPILE_TIMEOUT_S = 10.0
_FIELDS = set(StructuredOutputsParams.KINDS) | {"disable_any_whitespace"}
_GUIDED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


def from_response_format(rf: dict[str, Any] | None) -> StructuredOutputsParams | None:
    """OpenAI's response_format: text, json_object, json_schema (+ vLLM's structural_tag)."""
    if rf is None:
        return None
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        js = rf.get("json_schema")
        schema = js.get("schema") if isinstance(js, dict) else None
        if not isinstance(schema, dict):
            raise APIError(
                400,
                "response_format json_schema needs json_schema.schema (a JSON schema object)",
                param="response_format",
            )
        return StructuredOutputsParams(json=schema)
    if kind == "structural_tag":
        return StructuredOutputsParams(structural_tag=json.dumps(rf))
    raise APIError(
        400,
        f"response_format type {str(kind)[:40]!r} is not one of text, json_object, "
        "json_schema, structural_tag",
        param="response_format",
    )


def from_request(req: Any) -> tuple[StructuredOutputsParams | None, str | None]:
    """The constraint a chat or completions request asks for (None: free text), and the
    request field that carried it."""
    found = []
    so = getattr(req, "structured_outputs", None)
    if so is not None:
        fields = {k: v for k, v in so.items() if k in _FIELDS and v is not None}
        try:
            found.append(("structured_outputs", StructuredOutputsParams(**fields)))
        except ValueError as e:
            raise APIError(400, str(e), param="structured_outputs") from None
    rf = from_response_format(getattr(req, "response_format", None))
    if rf is not None:
        found.append(("response_format", rf))
    for name, kind in _GUIDED.items():
        value = getattr(req, name, None)
        if value is not None:
            try:
                found.append((name, StructuredOutputsParams(**{kind: value})))
            except ValueError as e:
                raise APIError(400, str(e), param=name) from None
    if len(found) > 1:
        raise APIError(
            400,
            f"{found[0][0]} and {found[1][0]} both constrain the output; send one",
            param=found[1][0],
        )
    return (found[0][1], found[0][0]) if found else (None, None)


_compilers: dict[int, Any] = {}
_lock = threading.Lock()


def _compiler(engine):
    """The engine's own compiler where it runs in this process, else one per tokenizer."""
    grammars = getattr(engine, "grammars", None)
    if callable(grammars):
        return grammars()
    from jaxmm.engine.structured import GrammarCompiler

    tok = engine.tokenizer
    with _lock:
        c = _compilers.get(id(tok))
        if c is None:
            cfg = getattr(engine.hf_config, "text_config", None) or engine.hf_config
            vocab = max(getattr(cfg, "vocab_size", 0) or 0, len(tok) if tok is not None else 0)
            c = _compilers[id(tok)] = GrammarCompiler(tok, vocab, None)
        return c


async def check(state, so: StructuredOutputsParams | None, param: str) -> None:
    """400 unless `so` compiles within the limits and COMPILE_TIMEOUT_S (off the event loop)."""
    if so is None:
        return
    from jaxmm.engine.structured import GrammarError

    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(state.pool, lambda: _compiler(state.client.engine).compile(so))
    try:
        await asyncio.wait_for(fut, COMPILE_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise APIError(
            400,
            f"the {so.kind} constraint took longer than {COMPILE_TIMEOUT_S:g} s to compile",
            param=param,
        ) from None
    except GrammarError as e:
        raise APIError(400, str(e), param=param) from None
