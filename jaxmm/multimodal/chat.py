"""Chat conversations -> prompts, through the model's chat template. No JAX.

Messages follow the OpenAI shape: `content` is a string or a list of parts
(`{"type": "text", "text": ...}`; media parts are handled by the multimodal front end).
The template is the tokenizer's (`apply_chat_template`) unless one is given.
"""

from __future__ import annotations


def _text_only(conversation: list[dict]) -> list[dict]:
    out = []
    for msg in conversation:
        if not isinstance(msg, dict) or "role" not in msg:
            raise ValueError(f"each message needs a 'role', got {msg!r}"[:200])
        content = msg.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(
                        f"content part of type {kind!r} needs a multimodal model; "
                        "this model takes text parts only"
                    )
                texts.append(part.get("text", ""))
            msg = {**msg, "content": "\n".join(texts)}
        out.append(msg)
    return out


def has_media(conversation: list[dict]) -> bool:
    for msg in conversation:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, list):
            if any(isinstance(p, dict) and p.get("type") != "text" for p in content):
                return True
    return False


def render_chat(
    tokenizer,
    conversation: list[dict],
    *,
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    chat_template_kwargs: dict | None = None,
    tools: list | None = None,
) -> str:
    if tokenizer is None:
        raise ValueError("chat needs a tokenizer (skip_tokenizer_init is on)")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "this model's tokenizer has no chat template and none was given; pass "
            "chat_template=... (a Jinja template string) or use generate() with a plain prompt"
        )
    return tokenizer.apply_chat_template(
        conversation,
        chat_template=chat_template,
        add_generation_prompt=add_generation_prompt and not continue_final_message,
        continue_final_message=continue_final_message,
        tools=tools,
        tokenize=False,
        **(chat_template_kwargs or {}),
    )


def conversation_to_prompt(engine, conversation: list[dict], **kwargs) -> dict:
    """A conversation -> {"prompt": text, "prompt_token_ids": ids} (or a multimodal prompt).

    `chat_template` may name a kept template (`chat_templates.NAMED_TEMPLATES`); without
    one, a tokenizer that has none gets its model type's fallback, if there is one."""
    from .chat_templates import resolve_chat_template

    model_type = getattr(getattr(engine, "hf_config", None), "model_type", None)
    tokenizer = getattr(engine, "tokenizer", None)
    kwargs["chat_template"] = resolve_chat_template(
        kwargs.get("chat_template"), tokenizer, model_type
    )
    if has_media(conversation):
        if not getattr(engine, "is_multimodal", False):
            _text_only(conversation)  # raises, naming the part type
        from .chat_parts import conversation_to_mm_prompt

        return conversation_to_mm_prompt(engine, conversation, **kwargs)
    kwargs.pop("mm_processor_kwargs", None)  # no media: nothing to process
    text = render_chat(engine.tokenizer, _text_only(conversation), **kwargs)
    # the template already holds BOS and friends
    ids = engine.tokenizer(text, add_special_tokens=False).input_ids
    return {"prompt": text, "prompt_token_ids": ids}
