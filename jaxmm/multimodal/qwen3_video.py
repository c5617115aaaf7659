"""Qwen3-VL video: frames, pixels and frame times as transformers' `Qwen3VLVideoProcessor` and
`Qwen3VLProcessor` make them. Numpy only, no JAX.

1. Frames are sampled (`do_sample_frames`, on by default): `fps` frames per second of the
   clip (2 by default), at least `min_frames`, at most `max_frames` and the clip's own count,
   or `num_frames` when set; uniformly over the clip, ends included (`sample_indices`). A clip
   of unknown rate is taken as 24 fps, as transformers does.
2. The pixel budget covers the whole sampled clip (`smart_resize`: frames x height x width
   within [shortest_edge, longest_edge], sides multiples of patch x merge), unlike Qwen2-VL's
   per-frame one.
3. Pixels: `video_pixels.py`'s torch-exact uint8 resize, fused normalisation and patch order
   (frames padded with the last one to a multiple of the temporal patch).
4. Time: each temporal patch's frames are averaged in seconds (`timestamps`); the processor
   writes `<{t:.1f} seconds>` before each frame's `<|vision_start|>` + tokens +
   `<|vision_end|>` (the model lays the span out: `models/qwen3_vl.py`).
"""

from __future__ import annotations

import math

import numpy as np

from . import video_pixels

PROCESSOR_TYPE = "Qwen3VLVideoProcessor"
UNKNOWN_FPS = 24.0  # transformers' rate for a clip without one
# `Qwen3VLVideoProcessor`'s class attributes: what its saved config leaves unsaid
PIXEL_DEFAULTS = {
    "size": {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768},
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "max_video_tokens": 768,
}
SAMPLING_DEFAULTS = {
    "do_sample_frames": True,
    "fps": 2,
    "num_frames": None,
    "min_frames": 4,
    "max_frames": 768,
}


def is_qwen3_video(config: dict) -> bool:
    return (config or {}).get("video_processor_type") == PROCESSOR_TYPE


def sample_indices(total: int, clip_fps: float, opts: dict) -> np.ndarray:
    """The kept frames of a `total`-frame clip at `clip_fps` (`Qwen3VLVideoProcessor.
    sample_frames`)."""
    if not opts["do_sample_frames"]:
        return np.arange(total)
    num, fps = opts["num_frames"], opts["fps"]
    if num is None and fps is not None:  # a frame count, when set, wins over the rate
        num = int(total / clip_fps * fps)
        num = min(max(num, opts["min_frames"]), opts["max_frames"], total)
    if num is None:
        num = min(max(total, opts["min_frames"]), opts["max_frames"])
    return np.linspace(0, total - 1, num).round().astype(int)


def smart_resize(
    num_frames: int, height: int, width: int, temporal_factor: int, factor: int, lo: int, hi: int
) -> tuple[int, int]:
    """transformers' Qwen3-VL video `smart_resize`, verbatim: (h, w) multiples of `factor`
    with frames x h x w within [lo, hi]."""
    if num_frames < temporal_factor:
        raise ValueError(f"t:{num_frames} must be larger than temporal_factor:{temporal_factor}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        ratio = max(height, width) / min(height, width)
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {ratio}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > hi:
        beta = math.sqrt((num_frames * height * width) / hi)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < lo:
        beta = math.sqrt(lo / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def timestamps(indices, fps: float, temporal_patch_size: int) -> list[float]:
    """Seconds of each temporal patch: its first and last frames' times averaged, the index
    list padded with its last entry (`Qwen3VLProcessor._calculate_timestamps`)."""
    indices = [int(i) for i in indices]
    tp = temporal_patch_size
    if len(indices) % tp:
        indices += [indices[-1]] * (tp - len(indices) % tp)
    times = [i / fps for i in indices]
    return [(times[i] + times[i + tp - 1]) / 2 for i in range(0, len(times), tp)]


def preprocess(frames: np.ndarray, fps: float | None, config: dict, overrides: dict) -> dict:
    """(T, H, W, 3) uint8 frames at `fps` (None: unknown) -> {"pixel_values", "grid_thw",
    "timestamps"} (seconds per temporal patch)."""
    frames = np.asarray(frames)
    clip_fps = float(fps) if fps else UNKNOWN_FPS
    opts = {**SAMPLING_DEFAULTS}
    for layer in (config or {}, overrides or {}):
        opts.update({k: v for k, v in layer.items() if k in SAMPLING_DEFAULTS and v is not None})
    indices = sample_indices(len(frames), clip_fps, opts)
    frames = frames[indices]
    s = video_pixels.VideoSettings.from_dict({**PIXEL_DEFAULTS, **(config or {})}, overrides)
    size = None
    if s.do_resize:
        factor, T = s.patch_size * s.merge_size, len(frames)
        hi = s.max_pixels
        if s.cap_pixels_per_frame:  # Qwen3-VL's per-frame cap (qwen-vl-utils)
            per_frame = max(min(s.max_video_tokens * factor**2, hi // T), int(s.min_pixels * 1.05))
            hi = per_frame * T
        H, W = frames.shape[1:3]
        size = smart_resize(T, H, W, s.temporal_patch_size, factor, s.min_pixels, hi)
    pixels, grid = video_pixels.preprocess(frames, s, size=size)
    return {
        "pixel_values": pixels,
        "grid_thw": grid,
        "timestamps": timestamps(indices, clip_fps, s.temporal_patch_size),
    }
