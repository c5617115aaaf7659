"""Text prompts -> token ids, shared by every engine. Plain Python, no JAX."""

from __future__ import annotations


def tokenize_prompt(prompt, tokenizer) -> tuple[str | None, list[int]]:
    """A str, {'prompt': str} or {'prompt_token_ids': [...]} -> (text or None, token ids)."""
    if isinstance(prompt, str):
        prompt = {"prompt": prompt}
    if not isinstance(prompt, dict):
        raise TypeError(
            "a prompt is a str, {'prompt': str} or {'prompt_token_ids': [...]}, "
            f"got {type(prompt).__name__}"
        )
    if "prompt_token_ids" in prompt:
        ids = prompt["prompt_token_ids"]
        if not isinstance(ids, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in ids
        ):
            raise ValueError("prompt_token_ids must be a list of integers")
        return prompt.get("prompt"), list(ids)
    if "prompt" not in prompt:
        raise ValueError(f"prompt dict needs 'prompt' or 'prompt_token_ids', got {sorted(prompt)}")
    text = prompt["prompt"]
    if not isinstance(text, str):
        raise TypeError(f"'prompt' must be a str, got {type(text).__name__}")
    if tokenizer is None:
        raise ValueError("the tokenizer is off (skip_tokenizer_init); pass prompt_token_ids")
    return text, list(tokenizer(text).input_ids)


def check_prompt_ids(ids: list[int], max_model_len: int, vocab_size: int) -> None:
    """The checks every engine makes of a prompt's token ids before queueing it."""
    if not ids:
        raise ValueError("the prompt is empty: it must contain at least one token")
    if len(ids) > max_model_len:
        raise ValueError(
            f"the prompt is {len(ids)} tokens long, but this model's maximum context length "
            f"is {max_model_len} tokens; shorten the input"
        )
    bad = [t for t in ids if t < 0 or t >= vocab_size]
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
