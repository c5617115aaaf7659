"""Logprobs in the OpenAI/vLLM JSON shapes."""

from __future__ import annotations

from jaxmm.outputs import Logprob


def token_text(token_id: int, lp: Logprob) -> str:
    return lp.decoded_token if lp.decoded_token is not None else f"token_id:{token_id}"


def finite(logprob: float) -> float:
    """JSON has no -inf: clamp like vLLM does."""
    return max(logprob, -9999.0)


def prompt_logprobs_json(entries: list[dict[int, Logprob] | None] | None) -> list | None:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {id: logprob info}."""
    if entries is None:
        return None
    return [
        None
        if e is None
        else {
            str(t): {
                "logprob": finite(lp.logprob),
                "rank": lp.rank,
                "decoded_token": lp.decoded_token,
            }
            for t, lp in e.items()
        }
        for e in entries
    ]


def top_entries(entry: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The k most likely tokens of one position, most likely first."""
    ranked = [(t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= k]
    ranked.sort(key=lambda x: x[1].rank)
    return ranked[:k]
