"""Structured outputs on the host: grammars compiled by llguidance, one matcher per sequence.

1. A request's `StructuredOutputsParams` (JSON schema, JSON object, regex, choice, Lark or
   GBNF grammar, structural tag) becomes an llguidance grammar and is checked against the
   tokenizer under `LIMITS` (fuel and size caps, so a pathological schema fails fast instead
   of stalling a thread). Checked grammars are cached by their source, so a schema sent with
   every request is compiled once.
2. Each constrained sequence holds an `LLMatcher`. Before a step samples it, the engine asks
   for its allowed-token bitmask (`fill`, one (V/32,) int32 row per sequence, written straight
   into the step's mask array); the sampler applies it on the device. After the step the
   sampled token is fed back (`advance`).

llguidance measured on this project's 2-core CPU with SmolLM2's 49,152-token vocabulary, a
5-property JSON schema: 13 us median per mask, 1 ms to compile (benchmarks/structured_mask.py).
The engine imports this module only when a request asks for structured output.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import numpy as np

from jaxmm.sampling_params import StructuredOutputsParams

# caps on what one grammar may cost; llguidance's defaults are 2-5x these
LIMITS = dict(
    max_items_in_row=2_000,
    initial_lexer_fuel=200_000,  # ~4 ms of regex analysis
    step_lexer_fuel=100_000,  # ~7 ms per mask at most
    step_max_items=20_000,
    max_lexer_states=20_000,
    max_grammar_size=50_000,
    verbose_errors=False,  # messages go to clients: no grammar dumps
)
_CACHE_SIZE = 256


class GrammarError(ValueError):
    """The constraint cannot be used (invalid, unsupported or over the limits)."""


def _limits():
    import llguidance

    return llguidance.LLParserLimits(**LIMITS)


def _json_schema(so: StructuredOutputsParams) -> dict | str:
    if so.json_object:
        return {"type": "object"}
    schema = so.json
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise GrammarError("the JSON schema must be a JSON object")
    return schema


def grammar_source(so: StructuredOutputsParams) -> str:
    """The llguidance grammar (a JSON string) for a constraint; no tokenizer needed."""
    from llguidance import LLMatcher, StructTag
    from llguidance.gbnf_to_lark import any_to_lark

    kind = so.kind
    try:
        if kind in ("json", "json_object"):
            opts = {"whitespace_flexible": not so.disable_any_whitespace}
            return LLMatcher.grammar_from_json_schema(_json_schema(so), defaults=opts)
        if kind == "regex":
            return LLMatcher.grammar_from_regex(so.regex)
        if kind == "choice":
            lark = "start: " + " | ".join(json.dumps(c) for c in so.choice)
            return LLMatcher.grammar_from_lark(lark)
        if kind == "grammar":
            return LLMatcher.grammar_from_lark(any_to_lark(so.grammar))
        if kind == "structural_tag":
            spec = json.loads(so.structural_tag)
            tags = []
            for s in spec["structures"]:
                trigger = next(t for t in spec["triggers"] if s["begin"].startswith(t))
                tags.append(
                    StructTag(trigger=trigger, begin=s["begin"], grammar=s["schema"], end=s["end"])
                )
            return StructTag.to_grammar(tags)
    except GrammarError:
        raise
    except Exception as e:  # malformed input of any kind: the client's to fix
        raise GrammarError(f"invalid {kind} constraint: {str(e)[:300]}") from None
    raise GrammarError(f"unknown structured output kind {kind!r}")


def cache_key(so: StructuredOutputsParams) -> str:
    value = getattr(so, so.kind)
    try:
        return json.dumps([so.kind, value, so.disable_any_whitespace], sort_keys=True, default=str)
    except RecursionError:
        raise GrammarError(f"the {so.kind} constraint is nested too deeply") from None


class GrammarCompiler:
    """Grammars for one tokenizer: built lazily (the llguidance tokenizer takes ~0.6 s for a
    49k vocabulary), validated under LIMITS, cached by source. Thread-safe."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_id: int | None):
        self.hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self._lltok = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, str] = OrderedDict()

    @property
    def lltokenizer(self):
        with self._lock:
            if self._lltok is None:
                import llguidance

                tok = self.hf_tokenizer
                if tok is None:
                    raise GrammarError("structured outputs need a tokenizer")
                backend = getattr(tok, "backend_tokenizer", None)
                if backend is None:
                    raise GrammarError("structured outputs need a fast (Rust) tokenizer")
                eos = self.eos_token_id if self.eos_token_id is not None else tok.eos_token_id
                self._lltok = llguidance.LLTokenizer(
                    backend.to_str(), n_vocab=self.vocab_size, eos_token=eos
                )
            return self._lltok

    def compile(self, so: StructuredOutputsParams) -> str:
        """The checked grammar for `so` (cached); GrammarError if it cannot be used."""
        key = cache_key(so)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        from llguidance import LLMatcher

        grammar = grammar_source(so)
        err = LLMatcher.validate_grammar(grammar, self.lltokenizer, limits=_limits())
        if err and not err.startswith("WARNING"):
            raise GrammarError(f"invalid {so.kind} constraint: {err[:300]}")
        # the first mask too: some grammars only overflow the parser's limits there
        m = LLMatcher(self.lltokenizer, grammar, limits=_limits(), log_level=0)
        m.compute_bitmask()
        m.compute_ff_tokens()
        if m.is_error():
            raise GrammarError(f"invalid {so.kind} constraint: {m.get_error()[:300]}")
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar

    def matcher(self, so: StructuredOutputsParams) -> Matcher:
        from llguidance import LLMatcher

        m = LLMatcher(self.lltokenizer, self.compile(so), limits=_limits())
        if m.is_error():
            raise GrammarError(f"invalid {so.kind} constraint: {m.get_error()[:300]}")
        return Matcher(m)


class Matcher:
    """One sequence's position in its grammar."""

    def __init__(self, m):
        self.m = m

    def fill(self, bitmask: np.ndarray, row: int) -> None:
        """Write the allowed tokens of the next position into bitmask[row] (int32 words)."""
        out = bitmask[row]
        self.m.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)

    def advance(self, token: int) -> bool:
        """Feed the sampled token; False if the grammar rejects it (the matcher is dead)."""
        return self.m.consume_token(token)

    @property
    def done(self) -> bool:
        return self.m.is_stopped()

    @property
    def error(self) -> str:
        return self.m.get_error()


_executor = None
_executor_lock = threading.Lock()


def fill_bitmasks(rows: list[tuple[int, Matcher]], bitmask: np.ndarray) -> None:
    """Fill the masks of several sequences: bitmask[row] for each (row, matcher).

    More than one row goes through llguidance's executor, which computes the masks on
    its own threads outside the GIL (64 JSON-schema rows: ~8 ms one by one on one core).
    """
    if len(rows) <= 1:
        for row, matcher in rows:
            matcher.fill(bitmask, row)
        return
    global _executor
    with _executor_lock:
        if _executor is None:
            import llguidance

            _executor = llguidance.LLExecutor()
    out = np.ascontiguousarray(bitmask)
    _executor.unsafe_compute_mask_ptr(
        [(m.m, row) for row, m in rows], out.ctypes.data, out.shape[1] * 4, out.shape[0]
    )
    if out is not bitmask:
        bitmask[...] = out
