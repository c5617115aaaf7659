"""Chat templates kept here: usable by name, and the fallback for checkpoints without one.

Some checkpoints ship no chat template (early LLaVA-1.5 conversions, base and embedding
checkpoints of the Qwen vision and audio models, Voxtral, whose template lives in
mistral_common); vLLM keeps templates for such model
types, and so does this module:
- `NAMED_TEMPLATES`: `--chat-template llava` (or `chat_template="llava"`) picks one by name;
- `FALLBACK_BY_MODEL_TYPE`: the HF config's `model_type` -> the template used when the
  tokenizer has none and none is given.
A checkpoint's own template always wins over the fallback. Templates read content given as
a string or as a list of parts; media parts render as the model's placeholder text, which
the multimodal front end expands. No JAX, nothing of the engine.
"""

from __future__ import annotations

# LLaVA-1.5's conversation format: "USER: <image>\n{text} ASSISTANT:" (images before the
# text of their turn), BOS first, an EOS after each assistant turn.
LLAVA = (
    "{% macro body(c) %}{% if c is string %}{{ c }}{% else %}"
    "{% for p in c %}{% if p['type'] == 'image' %}{{ '<image>\\n' }}{% endif %}{% endfor %}"
    "{% for p in c if p['type'] == 'text' %}{% if not loop.first %}{{ ' ' }}{% endif %}"
    "{{ p['text'] }}{% endfor %}{% endif %}{% endmacro %}"
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ body(m['content']) + '\\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'USER: ' + body(m['content']) + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' + body(m['content']) + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# ChatML as the Qwen models write it, with their image, video and audio placeholders and
# the default system turn when the conversation has none.
CHATML = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif p['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif p['type'] == 'audio' %}{{ '<|audio_bos|><|AUDIO|><|audio_eos|>' }}"
    "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Voxtral's instruct format as mistral_common encodes it: BOS, then per user turn
# "[INST]" + its parts in order (an audio as "[BEGIN_AUDIO][AUDIO]") + "[/INST]", each
# assistant turn followed by EOS.
VOXTRAL = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '[INST]' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'audio' %}{{ '[BEGIN_AUDIO][AUDIO]' }}"
    "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '[/INST]' }}"
    "{% elif m['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' + m['content'] + '[/SYSTEM_PROMPT]' }}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

NAMED_TEMPLATES = {"llava": LLAVA, "chatml": CHATML, "voxtral": VOXTRAL}

FALLBACK_BY_MODEL_TYPE = {
    "llava": "llava",
    "qwen2_vl": "chatml",
    "qwen2_5_vl": "chatml",
    "qwen2_audio": "chatml",
    "voxtral": "voxtral",
}


def resolve_chat_template(chat_template: str | None, tokenizer, model_type: str | None):
    """The template to render with: a name from NAMED_TEMPLATES becomes its text; None
    stays None (the tokenizer's own) unless the tokenizer has none and the model type has
    a fallback."""
    if chat_template is not None:
        return NAMED_TEMPLATES.get(chat_template, chat_template)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return None
    name = FALLBACK_BY_MODEL_TYPE.get(model_type or "")
    return NAMED_TEMPLATES[name] if name else None
