"""Qwen2-VL / Qwen2.5-VL video pixels as HF's own video processor makes them. Numpy, no torch.

transformers' `Qwen2VLVideoProcessor` (the one `Qwen2VLProcessor` and `Qwen2_5_VLProcessor`
use; it needs torchvision) is not the image processor applied frame by frame:

1. the resize runs on the uint8 frames through torch (`tvF.resize`, bicubic, antialias). On
   the CPU torch resamples uint8 with Pillow-SIMD's fixed-point separable filter, but with
   int16 weights whose precision is chosen per axis from the largest weight, where PIL uses
   22-bit int32 weights: the two differ by one level in some pixels (`resize_uint8`);
2. rescale and normalise are fused in float32: `(f32(x) - f32(mean) * 255) / (f32(std) * 255)`
   rather than PIL's `(f32(x * scale) - mean) / std`; each value is still a function of
   (channel, byte), so a (C, 256) table gives it;
3. frames are padded to a multiple of `temporal_patch_size` with copies of the last one and
   cut into (t, h/m, w/m, m, m) rows of (C, tp, p, p) columns;
4. a video without its own size settings falls back to the video processor's class defaults
   (`VIDEO_DEFAULTS`), not to the image processor's.

Where frames sit in time (Qwen2.5-VL's `second_per_grid_ts`) is the caller's (`processor.py`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from .fast_image import smart_resize

# HF `Qwen2VLVideoProcessor`'s class attributes: what a video config leaves unsaid.
VIDEO_DEFAULTS = {
    "do_resize": True,
    "size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768},
    "resample": 3,  # bicubic
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],  # OPENAI_CLIP_MEAN
    "image_std": [0.26862954, 0.26130258, 0.27577711],  # OPENAI_CLIP_STD
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "cap_pixels_per_frame": False,  # HF 5.x: None, read as False (with a warning)
    "max_video_tokens": 128000,
}
SETTINGS = tuple(VIDEO_DEFAULTS)
_FILTERS = {2: "bilinear", 3: "bicubic"}  # PIL resample ids HF maps to torch modes


@dataclass(frozen=True)
class VideoSettings:
    do_resize: bool
    min_pixels: int  # size["shortest_edge"]
    max_pixels: int  # size["longest_edge"]
    resample: int
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    cap_pixels_per_frame: bool
    max_video_tokens: int

    @classmethod
    def from_dict(cls, config: dict, overrides: dict | None = None) -> VideoSettings:
        """The video processor's settings: its config (missing keys: `VIDEO_DEFAULTS`), then
        call-time `overrides`; the legacy `min_pixels` / `max_pixels` keys, top level or
        inside `size`, set the pixel budget. Keys of neither kind are not the pixels'."""
        layers = [VIDEO_DEFAULTS, config, overrides or {}]
        kw = {k: v for layer in layers for k, v in layer.items() if k in SETTINGS and v is not None}
        size: dict = {}
        for layer in layers:
            size.update(_budget(layer))
        if size.get("shortest_edge") is None or size.get("longest_edge") is None:
            raise ValueError(f"a video `size` needs shortest_edge and longest_edge, got {size}")
        if int(kw["resample"]) not in _FILTERS:
            raise ValueError(f"video resample {kw['resample']} is not bilinear (2) or bicubic (3)")
        mean, std = kw["image_mean"], kw["image_std"]
        return cls(
            do_resize=bool(kw["do_resize"]),
            min_pixels=int(size["shortest_edge"]),
            max_pixels=int(size["longest_edge"]),
            resample=int(kw["resample"]),
            do_rescale=bool(kw["do_rescale"]),
            rescale_factor=float(kw["rescale_factor"]),
            do_normalize=bool(kw["do_normalize"]),
            image_mean=tuple(float(v) for v in np.broadcast_to(mean, (3,))),
            image_std=tuple(float(v) for v in np.broadcast_to(std, (3,))),
            patch_size=int(kw["patch_size"]),
            temporal_patch_size=int(kw["temporal_patch_size"]),
            merge_size=int(kw["merge_size"]),
            cap_pixels_per_frame=bool(kw["cap_pixels_per_frame"]),
            max_video_tokens=int(kw["max_video_tokens"]),
        )


def _budget(layer: dict) -> dict:
    """{shortest_edge, longest_edge} as far as one layer of settings gives them."""
    size = layer.get("size")
    if size is None:
        out = {}
    elif isinstance(size, dict):
        out = {k: v for k, v in size.items() if v is not None}
    else:  # HF's SizeDict
        keys = ("shortest_edge", "longest_edge", "min_pixels", "max_pixels")
        out = {k: getattr(size, k) for k in keys if getattr(size, k, None) is not None}
    for legacy, key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        if out.get(legacy) is not None:
            out[key] = out.pop(legacy)
        if layer.get(legacy) is not None:
            out[key] = layer[legacy]
    return {k: v for k, v in out.items() if k in ("shortest_edge", "longest_edge")}


def preprocess(
    frames: np.ndarray, s: VideoSettings, size: tuple[int, int] | None = None
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(T, H, W, 3) uint8 RGB frames -> (pixel_values (t*h*w, 3*tp*p*p) float32, (t, h, w)).

    size: the (h, w) to resize to where the caller's processor sizes frames its own way
    (Qwen3-VL: `qwen3_video.py`); None: Qwen2-VL's per-frame budget."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"a video must be (T, H, W, 3) uint8 frames, got {frames.shape}")
    T, H, W, C = frames.shape
    p, m, tp = s.patch_size, s.merge_size, s.temporal_patch_size
    if s.do_resize and size is not None:
        frames = resize_uint8(frames, size[0], size[1], _FILTERS[s.resample])
    elif s.do_resize:
        max_pixels = s.max_pixels
        if s.cap_pixels_per_frame:  # an even share of the whole video's pixel budget
            total = int(s.max_video_tokens * (p * m) ** 2 * 0.9)
            max_pixels = max(min(max_pixels, total * tp // T), int(s.min_pixels * 1.05))
        h, w = smart_resize(H, W, p * m, s.min_pixels, max_pixels)
        frames = resize_uint8(frames, h, w, _FILTERS[s.resample])
    T, H, W, C = frames.shape
    if T % tp:  # pad with copies of the last frame
        frames = np.concatenate([frames, np.repeat(frames[-1:], tp - T % tp, axis=0)])
    t, gh, gw = len(frames) // tp, H // p, W // p
    u8 = frames.reshape(t, tp, gh // m, m, p, gw // m, m, p, C)
    # rows (t, h/m, w/m, m, m), columns (C, tp, p, p)
    u8 = u8.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7).reshape(t * gh * gw, C, tp * p * p)
    table = _byte_table(s)
    pixels = table[np.arange(C)[:, None], u8]
    return pixels.reshape(t * gh * gw, C * tp * p * p), (t, gh, gw)


def _byte_table(s: VideoSettings) -> np.ndarray:
    """(3, 256) float32: each byte's value after HF's fused rescale + normalise (float32 ops,
    mean and std scaled by 1/rescale_factor in float32 first), or the plain rescale."""
    x = np.broadcast_to(np.arange(256, dtype=np.float32), (3, 256))
    if s.do_normalize:
        mean = np.asarray(s.image_mean, np.float32)[:, None]
        std = np.asarray(s.image_std, np.float32)[:, None]
        if s.do_rescale:
            inv = np.float32(1.0 / s.rescale_factor)
            mean, std = mean * inv, std * inv
        return (x - mean) / std
    if s.do_rescale:
        return x * np.float32(s.rescale_factor)
    return np.ascontiguousarray(x)


# ---------------------------------------------------------------------------------------
# torch's uint8 antialiased resize


def _bicubic(x: float) -> float:
    a = -0.5  # PIL's (and torch's antialiased) cubic coefficient
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return 0.0


def _bilinear(x: float) -> float:
    return max(0.0, 1.0 - abs(x))


def int16_weights(in_size: int, out_size: int, kind: str) -> tuple[np.ndarray, np.ndarray, int]:
    """One axis' taps for torch's uint8 antialiased resampling: (first source index (out,),
    int16 weights (out, K) as int32, precision bits). Float weights are computed in double
    and normalised per output like PIL's; they become ints scaled by 2**precision, with the
    largest precision (< 22) that keeps the largest weight under 2**15."""
    filt, half = (_bicubic, 2.0) if kind == "bicubic" else (_bilinear, 1.0)
    scale = in_size / out_size
    support = half * scale if scale >= 1.0 else half
    K = int(math.ceil(support)) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    first = np.zeros(out_size, np.int64)
    weights = np.zeros((out_size, K), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        n = min(max(min(int(center + support + 0.5), in_size) - lo, 0), K)
        w = [filt((j + lo - center + 0.5) * invscale) for j in range(n)]
        total = sum(w)  # left to right, as torch adds them
        if total != 0.0:
            w = [v / total for v in w]
        first[i] = lo
        weights[i, :n] = w
    wt_max = float(weights.max()) if weights.size else 0.0
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    v = weights * (1 << precision)
    ints = np.where(v < 0, np.trunc(v - 0.5), np.trunc(v + 0.5)).astype(np.int32)
    return first, ints, precision


def _resample_first(x: np.ndarray, out_size: int, kind: str) -> np.ndarray:
    """(N, R) uint8 resampled along its first axis to (out_size, R) uint8: the int32 sum of
    the taps plus half, shifted right by the precision and clamped to [0, 255] (torch's AVX2
    kernels and its generic uint8 loop). Whole rows are gathered per tap, so every step is a
    contiguous numpy op."""
    first, k, precision = _taps(x.shape[0], out_size, kind)
    last = x.shape[0] - 1
    acc = np.full((out_size, x.shape[1]), 1 << (precision - 1), np.int32)
    tmp = np.empty_like(acc)
    for j in range(k.shape[1]):
        # taps past the edge carry zero weight; clipping only keeps the gather in bounds
        np.multiply(x[np.minimum(first + j, last)], k[:, j : j + 1], out=tmp)
        acc += tmp
    return np.clip(acc >> precision, 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=32)
def _taps(in_size: int, out_size: int, kind: str) -> tuple[np.ndarray, np.ndarray, int]:
    return int16_weights(in_size, out_size, kind)


def resize_uint8(frames: np.ndarray, height: int, width: int, kind: str = "bicubic") -> np.ndarray:
    """(T, H, W, C) uint8 -> (T, height, width, C) uint8, as `torch.nn.functional.interpolate(
    mode=kind, antialias=True, align_corners=False)` resizes a uint8 tensor on the CPU:
    horizontal pass first, through a uint8 intermediate, then vertical; an axis of unchanged
    size is not resampled."""
    T, H, W, C = frames.shape
    out = np.empty((T, height, width, C), np.uint8)
    for t in range(T):  # a frame at a time: its int32 copies stay small
        a = frames[t]  # (H, W, C)
        if W != width:
            a = a.transpose(1, 0, 2).reshape(W, H * C)
            a = _resample_first(a, width, kind).reshape(width, H, C).transpose(1, 0, 2)
        if H != height:
            a = _resample_first(a.reshape(H, width * C), height, kind).reshape(height, width, C)
        out[t] = a
    return out
