"""Audio beside images and video in one prompt (Qwen2.5-Omni), and a video's own audio track.

The image front end (`inputs.MultimodalFrontend`) places every item of such a prompt; the
audio items are prepared by the engine's audio front end (`audio_inputs.AudioFrontend`:
loading, resampling, log-mel features, precomputed audio embeddings, its cache) and join
the others as items already resolved (`split_audio`).

`use_audio_in_video` (vLLM's `mm_processor_kwargs`, per prompt or for the engine) pairs
each video with one audio item, in order, as vLLM does: the audio is the video's track and
has no placeholder of its own. After both are prepared, each pair becomes one video item
whose data holds the video's pixels and the audio's features and whose span the model
writes (`mm_span_ids`: the two kinds of tokens interleaved by time); its key joins both
keys (`join_audio_in_video`). Without a video the option changes nothing (transformers:
there is no track to take). Host-only, no JAX.
"""

from __future__ import annotations

import hashlib

from .cache import EncoderOutput

AUDIO_KEYS = ("audio", "audio_embeds")
OPTION = "use_audio_in_video"


def has_vision_items(prompt) -> bool:
    """Whether a prompt's multi_modal_data holds anything besides audio."""
    data = prompt.get("multi_modal_data") if isinstance(prompt, dict) else None
    return isinstance(data, dict) and any(k not in AUDIO_KEYS for k in data)


def pop_option(kwargs: dict, default: bool = False) -> bool:
    """Take `use_audio_in_video` out of processor options (it shapes the prompt, no HF
    processor reads it)."""
    value = kwargs.pop(OPTION, None)
    if value is None:
        return bool(default)
    if not isinstance(value, bool):
        raise ValueError(f"mm_processor_kwargs[{OPTION!r}] must be a bool, got {value!r}")
    return value


def split_audio(prompt: dict, audio_frontend, proc_kwargs: dict, make_item) -> tuple[dict, list]:
    """(the prompt without its audio entries, the audio items resolved) for a prompt of the
    image front end. `make_item(index, uuid, key, output)` builds the front end's item."""
    data = prompt.get("multi_modal_data")
    names = [k for k in AUDIO_KEYS if isinstance(data, dict) and k in data]
    if not names:
        return prompt, []
    if audio_frontend is None:
        raise ValueError("a prompt with audio goes through the engine's audio front end")
    uuids = prompt.get("multi_modal_uuids")
    audio_uuids = None
    if isinstance(uuids, dict):
        audio_uuids = {k: v for k, v in uuids.items() if k in names} or None
    resolved = audio_frontend.resolve_items(
        {k: data[k] for k in names}, audio_uuids, dict(proc_kwargs)
    )
    rest = {**prompt, "multi_modal_data": {k: v for k, v in data.items() if k not in names}}
    if isinstance(uuids, dict):
        rest["multi_modal_uuids"] = {k: v for k, v in uuids.items() if k not in names}
    ids = (audio_uuids or {}).get("audio", (audio_uuids or {}).get("audio_embeds"))
    ids = ids if isinstance(ids, list) else [ids] * len(resolved)
    items = [
        make_item(i, uuid, key, output)
        for i, ((key, output), uuid) in enumerate(zip(resolved, ids, strict=True))
    ]
    return rest, items


def join_audio_in_video(model, items: list, tracks: list, encode_text) -> list:
    """Each video of `items` (prepared) with its audio track (`tracks`, prepared, in order)
    -> one video item over the interleaved span; the tracks leave the prompt. Returns the
    prompt's items."""
    videos = [it for it in items if it.modality == "video"]
    if not videos:  # no track to take
        return items + tracks
    if not getattr(model, "mm_audio_in_video", False):
        raise ValueError(f"{type(model).__name__} does not take {OPTION}")
    if len(tracks) != len(videos):
        raise ValueError(
            f"{OPTION} pairs each video with its audio track: the prompt has {len(videos)} "
            f"video(s) and {len(tracks)} audio item(s); give one audio per video, in order"
        )
    for video, track in zip(videos, tracks, strict=True):
        if not isinstance(video.output.data, dict) or not isinstance(track.output.data, dict):
            raise ValueError(
                f"{OPTION} takes each video's frames and its audio, not precomputed embeddings"
            )
        data = {**video.output.data, "audio": track.output.data}
        span = model.mm_span_ids("video", data, encode_text)
        data["span_ids"] = span
        rows = model.mm_num_tokens("video", data)
        meta = {**video.output.meta, "span_ids": span}
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{OPTION}\0{video.key}\0{track.key}".encode())
        video.key = h.hexdigest()
        video.output = EncoderOutput("video", data, rows, meta)
    return items
