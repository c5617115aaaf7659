"""Chat content parts -> a multimodal prompt, through the model's chat template. No JAX.

`conversation_to_mm_prompt` turns OpenAI-style messages whose content lists hold media parts
into the prompt dict the front end takes (`inputs.prepare_multimodal_prompt`): each part
becomes an item of `multi_modal_data` (with its "uuid", if any) and a placeholder in the
rendered text. `chat.conversation_to_prompt` sends conversations with media here.
"""

from __future__ import annotations

from .inputs import MultimodalFrontend
from .media import MediaPolicy
from .values import _limit, _split_by_grid

_PART_MODALITY = {
    "image_url": "image",
    "image_pil": "image",
    "image": "image",
    "image_embeds": "image",
    "video_url": "video",
    "video": "video",
    "input_audio": "audio",
    "audio_url": "audio",
    "audio": "audio",
    "audio_embeds": "audio",
}
# `input_audio` formats: what libsndfile decodes, and containers librosa's audioread
# fallback reads when FFmpeg is installed. The bytes are sniffed either way; the declared
# format only has to be one of these.
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "opus", "aiff", "webm", "m4a", "aac")


def _part_item(part: dict):
    kind = part["type"]
    value = part.get(kind)
    if kind in ("image_url", "video_url", "audio_url"):
        if isinstance(value, dict):
            value = value.get("url")
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{kind} must be a URL string or {{'url': ...}}")
    if kind == "input_audio" and value is not None:
        if not isinstance(value, dict):
            raise ValueError("input_audio must be {'data': <base64>, 'format': 'wav' | 'mp3' ...}")
        fmt = value.get("format")
        if fmt is not None and (not isinstance(fmt, str) or fmt.lower() not in AUDIO_FORMATS):
            raise ValueError(
                f"input_audio format {fmt!r} is not supported; supported: "
                + ", ".join(AUDIO_FORMATS)
            )
        value = value.get("data")
        if value is not None and not isinstance(value, str):
            raise ValueError("input_audio data must be a base64 string")
    if kind == "image_embeds" and value is not None and not isinstance(value, dict):
        value = {"image_embeds": value}
    if kind == "image_embeds" and isinstance(value, dict) and "image_embeds" not in value:
        raise ValueError("an image_embeds part needs 'image_embeds'")
    return value


def _load_audio_part(kind: str, value, policy: MediaPolicy):
    """An audio part's payload -> (samples, sample_rate) under the media policy (URLs,
    base64 and file bytes); in-memory audio goes to the audio front end as is."""
    from .media import decode_base64_payload, load_audio

    if value is None:
        return None  # served from the encoder cache by its uuid
    if kind == "audio_embeds":
        return value  # AudioEmbeds: checked (and gated) by the audio front end
    if kind == "input_audio":
        data = decode_base64_payload(
            value, max_bytes=policy.max_download_bytes, what="input_audio data"
        )
        return load_audio(data, policy)
    if isinstance(value, (str, bytes, bytearray, memoryview)):
        return load_audio(value if isinstance(value, str) else bytes(value), policy)
    return value


def _takes_parts(template: str | None) -> bool:
    """Whether a chat template reads OpenAI-style content lists (else it wants strings)."""
    if not template:
        return False
    return "type" in template and any(m in template for m in ("image", "video", "audio"))


def _check_modality(model, kind: str, modality: str) -> None:
    supported = tuple(getattr(model, "mm_modalities", ()))
    if modality not in supported:
        name = type(model).__name__
        raise ValueError(
            f"content part type {kind!r} is not supported by {name}: it is {modality}, and "
            f"{name} takes text and {', '.join(supported)} parts"
        )
    if modality == "audio" and getattr(model, "is_encoder_decoder", False):
        raise ValueError(
            f"{type(model).__name__} is a speech-to-text model, not a chat model: send audio "
            "to /v1/audio/transcriptions (LLM.transcribe), or chat with an audio-language "
            "model such as Qwen2-Audio"
        )


def _placeholder_text(fe: MultimodalFrontend, modality: str) -> str:
    if modality == "audio":  # audio models name their placeholder as text
        return fe.model.mm_placeholder_text(modality)
    return fe.placeholder_text(modality)


def _audio_in_video(fe, mm_processor_kwargs: dict | None) -> bool:
    """use_audio_in_video of the request, else of the engine (its mm_processor_kwargs)."""
    value = (mm_processor_kwargs or {}).get("use_audio_in_video")
    if value is None:
        config = getattr(fe, "config", None)
        value = (getattr(config, "mm_processor_kwargs", None) or {}).get("use_audio_in_video")
    return bool(value)


def _has_video(conversation: list[dict]) -> bool:
    return any(
        isinstance(part, dict) and _PART_MODALITY.get(part.get("type")) == "video"
        for msg in conversation
        if isinstance(msg, dict) and isinstance(msg.get("content"), list)
        for part in msg["content"]
    )


def conversation_to_mm_prompt(engine, conversation: list[dict], **kwargs) -> dict:
    """OpenAI-style messages with media parts -> a multimodal prompt dict.

    Parts: text; image_url ({"url": ...}, a data: URL included); image_pil; image (any image
    form); image_embeds (array, base64 .npy/torch payload, or a dict with image_grid_thw, a
    grid given the same ways; a (N, 3) grid makes the part N images);
    video_url; video (frames); audio_embeds (as image_embeds, without a grid: (n, D) rows of
    one audio, (N, n, D) of N); input_audio ({"data": <base64>, "format": "wav" | "mp3" ...});
    audio_url ({"url": ...}: http(s), data:audio/...;base64, file://); audio ((samples, rate),
    an array at the model's rate, or file bytes). Any media part may carry a "uuid"; a part
    whose media is None (or a URL part without a url) is served from the encoder cache by
    that uuid. URLs and base64 audio are fetched and decoded here, under the engine's
    MediaPolicy, after the per-prompt limits are checked.
    """
    from .chat import render_chat

    fe = engine.mm_frontend()
    media_io_kwargs = kwargs.pop("media_io_kwargs", None)
    mm_processor_kwargs = kwargs.pop("mm_processor_kwargs", None)
    render_kwargs = {
        k: kwargs[k]
        for k in (
            "chat_template",
            "add_generation_prompt",
            "continue_final_message",
            "chat_template_kwargs",
            "tools",
        )
        if k in kwargs
    }
    template = render_kwargs.get("chat_template") or getattr(fe.tokenizer, "chat_template", None)
    as_parts = _takes_parts(template if isinstance(template, str) else None)
    # use_audio_in_video: an audio part is the track of a video of the conversation, and
    # takes no placeholder of its own (vLLM's rule)
    tracks = _has_video(conversation) and _audio_in_video(fe, mm_processor_kwargs)
    data: dict[str, list] = {}
    uuids: dict[str, list] = {}
    audio_kinds: list[str] = []  # the part type of each audio item, to load it after the limits
    messages = []
    for msg in conversation:
        if not isinstance(msg, dict) or "role" not in msg:
            raise ValueError(f"each message needs a 'role', got {msg!r}"[:200])
        content = msg.get("content")
        if not isinstance(content, list):
            messages.append(msg)
            continue
        rendered_parts, texts = [], []
        for part in content:
            if not isinstance(part, dict) or "type" not in part:
                raise ValueError(f"a content part is a dict with a 'type', got {part!r}"[:200])
            kind = part["type"]
            if kind == "text":
                rendered_parts.append({"type": "text", "text": part.get("text", "")})
                texts.append(part.get("text", ""))
                continue
            if kind not in _PART_MODALITY:
                raise ValueError(
                    f"content part type {kind!r} is not supported; supported: text, "
                    + ", ".join(_PART_MODALITY)
                )
            modality = _PART_MODALITY[kind]
            _check_modality(fe.model, kind, modality)
            items = [_part_item(part)]
            if kind == "audio_embeds":  # (n, D) is one audio, (N, n, D) N of them
                from .audio_inputs import audio_embed_items

                items = audio_embed_items(items[0]) if items[0] is not None else items
            if kind == "image_embeds":  # one part may hold several images' rows and grids
                items = _split_by_grid(items, "image")
            if len(items) > 1 and part.get("uuid") is not None:
                raise ValueError(
                    f"an {kind} part of {len(items)} items takes no 'uuid': send one part per "
                    "item to name each"
                )
            for item in items:
                data.setdefault(modality, []).append(item)
                uuids.setdefault(modality, []).append(part.get("uuid"))
                if modality == "audio":
                    audio_kinds.append(kind)
                    if tracks:
                        continue
                rendered_parts.append({"type": modality})
                texts.append(_placeholder_text(fe, modality))
        content = rendered_parts if as_parts else "\n".join(texts)
        messages.append({**msg, "content": content})
    if "audio" in data:
        limit = _limit(fe.config.limit_mm_per_prompt, "audio")
        if limit is not None and len(data["audio"]) > limit:
            raise ValueError(
                f"this prompt has {len(data['audio'])} audio item(s), more than the {limit} "
                f"allowed per prompt (limit_mm_per_prompt={{'audio': {limit}}})"
            )
        data["audio"] = [
            _load_audio_part(kind, value, fe.policy)
            for kind, value in zip(audio_kinds, data["audio"], strict=True)
        ]
    text = render_chat(fe.tokenizer, messages, **render_kwargs)
    prompt = {
        "prompt": text,
        # the template already holds BOS and friends
        "prompt_token_ids": fe.tokenizer(text, add_special_tokens=False).input_ids,
        "multi_modal_data": data,
    }
    if any(u is not None for us in uuids.values() for u in us):
        prompt["multi_modal_uuids"] = uuids
    if media_io_kwargs:
        prompt["media_io_kwargs"] = media_io_kwargs
    if mm_processor_kwargs:
        prompt["mm_processor_kwargs"] = mm_processor_kwargs
    return prompt
