"""Pydantic schemas of the OpenAI API requests the server accepts (and vLLM's extensions).

Requests are parsed by hand (`parse_request`) so that a malformed body is a 400 with an
OpenAI-style error naming the field, never FastAPI's 422. Unknown fields are ignored, as
OpenAI clients send fields a server may not know. Range checks on sampling fields live in
`SamplingParams` (one source of truth); here only types are checked. Responses are built
as plain dicts by the endpoint modules.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jaxmm.server.errors import APIError

_MAX_N = 128


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(_Request):
    """Sampling fields shared by chat and completions (OpenAI + vLLM extensions)."""

    model: str | None = None
    n: Annotated[int, Field(ge=1, le=_MAX_N)] = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    spaces_between_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    user: str | None = None
    # vLLM extensions
    prompt_logprobs: int | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[dict[str, Any]], Field(min_length=1)]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    # vLLM extensions
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    mm_processor_kwargs: dict[str, Any] | None = None  # e.g. {"use_audio_in_video": true}


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    response_format: dict[str, Any] | None = None


class TokenizeCompletionRequest(_Request):
    """vLLM's /tokenize for a plain prompt."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Request):
    """vLLM's /tokenize for chat messages (rendered through the chat template)."""

    model: str | None = None
    messages: Annotated[list[dict[str, Any]], Field(min_length=1)]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # the template already holds BOS and friends
    add_special_tokens: bool = False
    return_token_strs: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class EmbeddingRequest(_Request):
    model: str | None = None
    # `input`, or vLLM's chat form: `messages` (content parts with media) rendered through
    # the chat template, for a vision-language model served with --runner pooling
    input: str | list[str] | list[int] | list[list[int]] | None = None
    messages: list[dict[str, Any]] | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = False  # vLLM's default for embedding chats
    continue_final_message: bool = False


def _no_constant(name: str):
    # Python's json accepts NaN and +-Infinity; JSON does not, and a NaN temperature would
    # pass every range check
    raise json.JSONDecodeError(f"{name} is not valid JSON", name, 0)


def parse_request(model_cls: type[BaseModel], body: bytes) -> Any:
    """A request body -> `model_cls`, or an APIError 400 that names the bad field."""
    try:
        data = json.loads(body, parse_constant=_no_constant) if body else None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


_UNION_HELP = {
    "prompt": "a string, a list of strings, a list of token ids or a list of such lists",
    "input": "a string, a list of strings, a list of token ids or a list of such lists",
    "stop": "a string or a list of strings",
    "tool_choice": "a string or an object",
}


def validation_error(e: ValidationError) -> APIError:
    errors = e.errors()
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = loc[0] if loc else None
    same_field = [err for err in errors if err.get("loc", (None,))[0] == field]
    if field and len(same_field) > 1 and len(errors) == len(same_field):
        # a union type (e.g. prompt): pydantic reports one error per alternative
        accepted = _UNION_HELP.get(field, "one of the accepted types")
        return APIError(400, f"{field} must be {accepted}", param=field)
    where = ".".join(loc)
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return APIError(400, f"{where}: {msg}{more}" if where else msg + more, param=field)


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    out = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out
