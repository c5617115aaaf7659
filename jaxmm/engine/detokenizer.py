"""Incremental detokenization and stop conditions, on the host. Plain Python.

Text is decoded over a short window of ids (prefix offset .. end) so multi-byte characters
and leading spaces come out right; an incomplete UTF-8 tail ("\ufffd") waits for the next
token. Stop strings end the text before the stop string (unless asked to keep it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DetokState:
    prefix_offset: int
    read_offset: int
    text: str = ""


def new_state(num_prompt_tokens: int) -> DetokState:
    return DetokState(prefix_offset=max(num_prompt_tokens - 5, 0), read_offset=num_prompt_tokens)


def detokenize_incrementally(
    tokenizer, all_ids: list[int], st: DetokState, skip_special: bool, end: int | None = None
) -> str:
    """Append the text of newly added ids (up to `end`) to st.text; returns the new piece."""
    end = len(all_ids) if end is None else end
    prefix = tokenizer.decode(
        all_ids[st.prefix_offset : st.read_offset], skip_special_tokens=skip_special
    )
    full = tokenizer.decode(all_ids[st.prefix_offset : end], skip_special_tokens=skip_special)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        delta = full[len(prefix) :]
        st.prefix_offset = st.read_offset
        st.read_offset = end
        st.text += delta
        return delta
    return ""


def find_stop_string(text: str, delta_len: int, stops: list[str]) -> tuple[str, int] | None:
    """First stop string that appears in the text's new part; returns (stop, index)."""
    best = None
    for stop in stops:
        start = max(0, len(text) - delta_len - len(stop) + 1)
        idx = text.find(stop, start)
        if idx != -1 and (best is None or idx < best[1]):
            best = (stop, idx)
    return best
