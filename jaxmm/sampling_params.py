"""User-facing sampling parameters (vLLM-shaped), validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_MAX_LOGPROBS = 20
_MAX_LOGIT_BIAS = 300  # entries per request (jaxmm.layers.logits_processors.MAX_LOGIT_BIAS)


@dataclass
class StructuredOutputsParams:
    """A constraint on the output (vLLM's `structured_outputs`): exactly one of
    `json` (a JSON schema, dict or string), `json_object` (any JSON object), `regex`,
    `choice` (one of these strings), `grammar` (Lark, or GBNF/EBNF as llama.cpp writes it),
    `structural_tag` (llguidance's structural tag, a JSON string)."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    # JSON: no whitespace between tokens (the compact form) unless this is False
    disable_any_whitespace: bool = True

    def __post_init__(self) -> None:
        kinds = [k for k in self.KINDS if getattr(self, k) not in (None, False)]
        if len(kinds) != 1:
            raise ValueError(
                "StructuredOutputsParams needs exactly one of "
                f"{', '.join(self.KINDS)}; got {kinds or 'none'}"
            )
        if self.choice is not None and (
            not isinstance(self.choice, list)
            or not self.choice
            or not all(isinstance(c, str) for c in self.choice)
        ):
            raise ValueError("StructuredOutputsParams.choice must be a non-empty list of strings")
        for name in ("regex", "grammar", "structural_tag"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"StructuredOutputsParams.{name} must be a string")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ValueError("StructuredOutputsParams.json must be a JSON schema (dict or str)")

    KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")

    @property
    def kind(self) -> str:
        return next(k for k in self.KINDS if getattr(self, k) not in (None, False))


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    spaces_between_special_tokens: bool = True
    # token id -> added to its logit, in [-100, 100] (OpenAI's logit_bias)
    logit_bias: dict[int, float] | None = None
    # top logprobs per prompt token (0: just the prompt token's own); None: off
    prompt_logprobs: int | None = None
    structured_outputs: StructuredOutputsParams | None = None
    # filled by the engine: stop strings as a list
    _stop: list[str] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if self.temperature < 0:
            bad("temperature", "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", "must be -1, 0 (off) or a positive integer")
        if self.top_k == -1:
            self.top_k = 0
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be in [0, 1]")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "must be an integer or None")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            bad("max_tokens", "must be an integer >= 1 or None")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= _MAX_LOGPROBS
        ):
            bad("logprobs", f"must be an integer in [0, {_MAX_LOGPROBS}] or None")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", "must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be > 0")
        if self.stop is None:
            self._stop = []
        elif isinstance(self.stop, str):
            self._stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) for s in self.stop):
            self._stop = list(self.stop)
        else:
            bad("stop", "must be a string, a list of strings or None")
        if any(s == "" for s in self._stop):
            bad("stop", "must not contain empty strings")
        if self.stop_token_ids is not None and not all(
            isinstance(t, int) and t >= 0 for t in self.stop_token_ids
        ):
            bad("stop_token_ids", "must be a list of non-negative integers")
        if self.logit_bias is not None:
            self.logit_bias = _check_logit_bias(self.logit_bias)
        if self.prompt_logprobs is not None and (
            not isinstance(self.prompt_logprobs, int)
            or not 0 <= self.prompt_logprobs <= _MAX_LOGPROBS
        ):
            bad("prompt_logprobs", f"must be an integer in [0, {_MAX_LOGPROBS}] or None")
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            bad("structured_outputs", "must be a StructuredOutputsParams")
        if self.temperature < 1e-5:
            # greedy: sampling filters do not matter
            self.temperature = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def stop_strings(self) -> list[str]:
        return self._stop

    @property
    def uses_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


def _check_logit_bias(bias: Any) -> dict[int, float]:
    """{token id: bias}; ids may come as strings (JSON object keys)."""
    if not isinstance(bias, dict):
        raise ValueError(f"SamplingParams.logit_bias must be a dict, got {type(bias).__name__}")
    if len(bias) > _MAX_LOGIT_BIAS:
        raise ValueError(
            f"SamplingParams.logit_bias has {len(bias)} entries; at most {_MAX_LOGIT_BIAS}"
        )
    out = {}
    for k, v in bias.items():
        try:
            tid = int(k)
        except (TypeError, ValueError):
            raise ValueError(
                f"SamplingParams.logit_bias keys must be token ids, got {str(k)[:40]!r}"
            ) from None
        if tid < 0:
            raise ValueError(f"SamplingParams.logit_bias has a negative token id {tid}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise ValueError(
                f"SamplingParams.logit_bias values must be numbers in [-100, 100], got {v!r}"
            )
        out[tid] = float(v)
    return out
