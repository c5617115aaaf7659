"""Qwen2-VL / Qwen2.5-VL image pixels without HF's per-call overhead. Plain numpy + PIL, no JAX.

HF's PIL-backend `Qwen2VLImageProcessorPil` (what `AutoImageProcessor` builds where torchvision
is absent) spends most of its time on float64 copies of the whole image (issue #4; on a dev
CPU 2.6 ms at 448² and 37-44 ms at 1344², against 1.1 and 19 ms here). This module produces
the same bytes:

1. convert to RGB exactly as the installed transformers' `convert_to_rgb` does: from 5.21 alpha
   and palette transparency are composited onto white and everything else is `convert("RGB")`;
   up to 5.20 every non-RGB image is `convert("RGB")`, transparency dropped (`hf_composites`);
2. resize the uint8 PIL image to `smart_resize`'s (h, w) with the same filter (HF also resizes
   the uint8 image: `to_pil_image` keeps uint8 input as uint8, `reducing_gap=None`; at the
   image's own size PIL's resize is a copy, so it is skipped);
3. patchify the uint8 pixels: (n, C, p*p) bytes, rows in HF's (h/m, w/m, m, m) patch order;
4. map each byte through a (C, 256) float32 table and repeat the image tp times:
   HF's (n, C*tp*p*p) float32 `pixel_values`.

Step 4 is why the result is bitwise HF's: every value HF computes after the resize is a
function of (channel, byte) only. Rescale is `f32(f64(v) * scale)` and normalize is
`(x - f32(mean)) / f32(std)` in float32; each is a correctly rounded IEEE op, so evaluating
them once on the 256 bytes (in HF's order and dtypes) gives the same float as evaluating
them on every pixel.

Steps 3-4 run here (`expand`, numpy) or, for a tower that takes them, on the accelerator:
`preprocess(..., patch_bytes=True)` stops after step 2 and returns `PatchBytes`: the image's
bytes as they are, where each patch starts in them, and the table. It stands for the float
array (its `shape`; `np.asarray` patchifies and expands it). The Qwen2-VL encoder gathers the
patches and looks the bytes up inside its jitted program, so the tower sees the same floats
from 1/(4*tp) of the host memory and transfer: 5.4 MB instead of 43 MB at 1344², no 43 MB
array to fill on the host (15 ms on a dev CPU), and no patch reordering there either (5 ms
at 1344² on the H100 machine's CPU).

`settings_for` is the gate: it returns None (use HF) unless the image processor is exactly
HF's PIL Qwen2-VL class and every setting of the call is one implemented here.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

# The only class whose arithmetic this module reproduces (checked by name, no subclasses:
# the torchvision backend `Qwen2VLImageProcessor` resizes with torch and differs).
HF_CLASS = (
    "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl",
    "Qwen2VLImageProcessorPil",
)

# Call kwargs this module implements; any other key sends the call to HF.
SETTINGS = (
    "do_resize",
    "size",
    "resample",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
    "patch_size",
    "temporal_patch_size",
    "merge_size",
)
CHANNELS = 3  # RGB after conversion


@dataclass(frozen=True)
class Qwen2VLImageSettings:
    do_resize: bool
    min_pixels: int  # size["shortest_edge"]
    max_pixels: int  # size["longest_edge"]
    resample: int  # a PIL.Image.Resampling value
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    do_convert_rgb: bool
    composite_transparency: bool  # hf_composites(transformers.__version__): how step 1 converts
    patch_size: int
    temporal_patch_size: int
    merge_size: int

    def __post_init__(self):
        if min(self.patch_size, self.temporal_patch_size, self.merge_size) < 1:
            raise ValueError(f"patch sizes must be positive: {self}")
        if self.do_normalize and not (len(self.image_mean) == len(self.image_std) == CHANNELS):
            raise ValueError(f"image_mean / image_std need {CHANNELS} values: {self}")


def settings_for(image_processor, kwargs: dict) -> Qwen2VLImageSettings | None:
    """The settings HF would use for `image_processor(images, **kwargs)`, or None if this module
    does not implement the processor class or one of the settings (the caller then uses HF)."""
    cls = type(image_processor)
    if (cls.__module__, cls.__qualname__) != HF_CLASS:
        return None
    if any(k not in SETTINGS for k in kwargs):
        return None
    # HF: call kwargs override the instance's attributes (`kwargs.setdefault(name, attr)`)
    kw = {k: kwargs[k] if k in kwargs else getattr(image_processor, k, None) for k in SETTINGS}
    if any(kw[k] is None for k in SETTINGS if k not in ("image_mean", "image_std")):
        return None
    size = _pixel_budget(kw["size"])
    resample = kw["resample"]
    if size is None or not isinstance(resample, int) or isinstance(resample, bool):
        return None
    ints = ("patch_size", "temporal_patch_size", "merge_size")
    if not all(isinstance(kw[k], int) and kw[k] >= 1 for k in ints):
        return None
    if not isinstance(kw["rescale_factor"], (int, float)):
        return None
    mean, std = _per_channel(kw["image_mean"]), _per_channel(kw["image_std"])
    if kw["do_normalize"] and (mean is None or std is None):
        return None
    return Qwen2VLImageSettings(
        do_resize=bool(kw["do_resize"]),
        min_pixels=size[0],
        max_pixels=size[1],
        resample=int(resample),
        do_rescale=bool(kw["do_rescale"]),
        rescale_factor=float(kw["rescale_factor"]),
        do_normalize=bool(kw["do_normalize"]),
        image_mean=mean or (),
        image_std=std or (),
        do_convert_rgb=bool(kw["do_convert_rgb"]),
        composite_transparency=_installed_hf_composites(),
        patch_size=kw["patch_size"],
        temporal_patch_size=kw["temporal_patch_size"],
        merge_size=kw["merge_size"],
    )


@dataclass(frozen=True, eq=False)
class PatchBytes:
    """HF's `pixel_values` (n, C*tp*p*p) float32, held as the bytes they come from (steps 3-4
    not yet applied): the images' uint8 pixels, where each patch starts in them, and the
    per-channel byte table.

    It reads as the float array it stands for where only the shape matters (`shape`, `len`,
    `np.shape`), and `np.asarray` builds it on the host; towers that take it gather the patches
    and expand them on the device (`jaxmm.models.encoders.qwen2_vl_vision.patch_pixels`).
    """

    data: np.ndarray  # (n, C, p*p) uint8: the images' (h, w, C) bytes back to back, n*C*p*p
    sources: np.ndarray  # (n, 2) int32: patch k's first byte in `data` and its row stride
    table: np.ndarray  # (C, 256) float32: HF's value of each byte, per channel
    temporal_patch_size: int  # tp: each patch holds the image tp times

    dtype = np.dtype(np.float32)  # of the values it stands for

    @property
    def shape(self) -> tuple[int, int]:
        n, C, pp = self.data.shape
        return n, C * self.temporal_patch_size * pp

    def __len__(self) -> int:
        return self.data.shape[0]

    def patches(self) -> np.ndarray:
        """(n, C, p*p) uint8 in HF's patch order (step 3), on the host."""
        return self.data.reshape(-1)[gather_index(self.sources, *self.data.shape[1:])]

    def __array__(self, dtype=None, copy=None):
        out = expand(self.patches(), self.table, self.temporal_patch_size)
        return out if dtype is None else out.astype(dtype, copy=False)


def patch_sources(h: int, w: int, C: int, p: int, m: int, start: int = 0) -> np.ndarray:
    """(gh*gw, 2) int32 for an (h, w, C) image at byte `start`: each patch's first byte and
    the row stride (w*C), patches in HF's (h/m, w/m, m, m) order."""
    gh, gw = h // p, w // p
    bh = np.arange(gh // m).reshape(-1, 1, 1, 1)
    bw = np.arange(gw // m).reshape(1, -1, 1, 1)
    mh = np.arange(m).reshape(1, 1, -1, 1)
    mw = np.arange(m).reshape(1, 1, 1, -1)
    first = start + ((bh * m + mh) * p * w + (bw * m + mw) * p) * C  # (gh/m, gw/m, m, m)
    out = np.empty((gh * gw, 2), np.int32)
    out[:, 0] = np.broadcast_to(first, (gh // m, gw // m, m, m)).reshape(-1)
    out[:, 1] = w * C
    return out


def gather_index(sources, C: int, pp: int, xp=np):
    """(n, C, p*p) flat byte indices of the patches `sources` names (numpy or jax.numpy):
    byte (c, py, px) of patch k is at first_k + py * stride_k + px * C + c."""
    p = math.isqrt(pp)
    q = xp.arange(pp)
    within = (q // p)[None, None, :] * sources[:, 1, None, None] + ((q % p) * C)[None, None, :]
    return sources[:, 0, None, None] + within + xp.arange(C)[None, :, None]


def preprocess(
    images: Sequence[Image.Image], s: Qwen2VLImageSettings, patch_bytes: bool = False
) -> dict | None:
    """PIL images -> {"pixel_values": (n, C*tp*p*p) float32, "image_grid_thw": (len, 3) int64},
    HF's outputs byte for byte; None where HF would take a path not reproduced here (an input
    that is not a PIL image, a shape HF's patchify rejects), so the caller falls back to HF.
    patch_bytes: "pixel_values" is a `PatchBytes` (steps 1-3; step 4 left to its consumer)."""
    pixels = []
    for image in images:
        u8 = _rgb_uint8(image, s)
        if u8 is None:
            return None
        pixels.append(u8)
    factor = s.patch_size * s.merge_size
    grids = []
    for u8 in pixels:
        h, w = u8.shape[:2]
        if h % factor or w % factor:  # only without resize: HF's reshape raises
            return None
        grids.append([1, h // s.patch_size, w // s.patch_size])
    if not patch_bytes:
        patches = [_patchify(u8, s) for u8 in pixels]
        data = patches[0] if len(patches) == 1 else np.concatenate(patches, axis=0)
        values = expand(data, _byte_table(s), s.temporal_patch_size)
        return {"pixel_values": values, "image_grid_thw": np.array(grids, dtype=np.int64)}
    p, C = s.patch_size, CHANNELS
    flat = [np.ascontiguousarray(u8).reshape(-1) for u8 in pixels]
    data = flat[0] if len(flat) == 1 else np.concatenate(flat)
    starts = np.cumsum([0] + [f.size for f in flat])
    sources = np.concatenate(
        [patch_sources(*u8.shape[:2], C, p, s.merge_size, int(b)) for u8, b in zip(pixels, starts)]
    )
    values = PatchBytes(data.reshape(-1, C, p * p), sources, _byte_table(s), s.temporal_patch_size)
    return {"pixel_values": values, "image_grid_thw": np.array(grids, dtype=np.int64)}


def expand(data: np.ndarray, table: np.ndarray, temporal_patch_size: int) -> np.ndarray:
    """Step 4 on the host: (n, C, p*p) uint8 -> (n, C*tp*p*p) float32, columns (C, tp, p, p)."""
    n, C, pp = data.shape
    tp = temporal_patch_size
    out = np.empty((n, C, tp, pp), np.float32)
    for c in range(C):
        out[:, c, 0] = table[c][data[:, c]]
    for t in range(1, tp):  # the single image repeated over the temporal patch
        out[:, :, t] = out[:, :, 0]
    return out.reshape(n, C * tp * pp)


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 14 * 14 * 4 * 1280,
) -> tuple[int, int]:
    """HF's `smart_resize` (qwen2_vl image processors), verbatim: (h, w) divisible by `factor`,
    h*w within [min_pixels, max_pixels], aspect ratio kept as closely as possible."""
    if max(height, width) / min(height, width) > 200:
        ratio = max(height, width) / min(height, width)
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {ratio}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def hf_composites(version: str) -> bool:
    """Whether transformers `version`'s PIL `convert_to_rgb` composites alpha and palette (or
    tRNS) transparency onto white. 5.21.0 made it do so (checked on the released wheels: 5.20.2
    and earlier only `convert("RGB")`, 5.21.0 through 5.24.0 composite); PIL backends call it on
    every image, so it decides step 1's bytes. A 5.21 dev build counts as 5.21."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"not a transformers version: {version!r}")
    return (int(match[1]), int(match[2])) >= (5, 21)


def _installed_hf_composites() -> bool:
    # reached only once the processor is HF's class: transformers is already imported, and its
    # __version__ is that of the code the caller would otherwise run
    import transformers

    return hf_composites(transformers.__version__)


def _rgb_uint8(image, s: Qwen2VLImageSettings) -> np.ndarray | None:
    """Steps 1-2: (h, w, 3) uint8, converted and resized as HF does."""
    if not isinstance(image, Image.Image):
        return None
    if s.do_convert_rgb:
        # transformers.image_transforms.convert_to_rgb, PIL branch, as of the installed version
        transparent = "A" in image.getbands() or image.info.get("transparency") is not None
        if transparent and s.composite_transparency:  # >= 5.21: onto white
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba).convert("RGB")
        elif image.mode != "RGB":
            # <= 5.20 also for transparent images: alpha dropped, a palette's transparent
            # entry keeps its colour; an RGB image with a tRNS colour is kept as it is
            image = image.convert("RGB")  # (RGB -> RGB would only copy)
    elif image.mode != "RGB":
        return None  # HF keeps the raw bands (L: 1 channel, RGBA: 4); not reproduced
    if s.do_resize:
        if s.min_pixels <= 0 or s.max_pixels <= 0:
            return None  # HF raises on a falsy pixel budget
        # HF reads (h, w) from the array, then resizes the uint8 PIL image (reducing_gap=None)
        h, w = smart_resize(
            image.height,
            image.width,
            factor=s.patch_size * s.merge_size,
            min_pixels=s.min_pixels,
            max_pixels=s.max_pixels,
        )
        if (w, h) != image.size:  # (PIL's resize to the same size is a copy)
            image = image.resize((w, h), resample=s.resample, reducing_gap=None)
    return np.asarray(image)


def _patchify(u8: np.ndarray, s: Qwen2VLImageSettings) -> np.ndarray:
    """(h, w, C) uint8 -> (gh*gw, C, p*p) uint8 patches (step 3)."""
    p, m = s.patch_size, s.merge_size
    h, w, C = u8.shape
    gh, gw = h // p, w // p
    # rows (gh/m, gw/m, m, m), columns (C, p, p): HF's patch order. A channel at a time: the
    # copies then move runs of p bytes, not single bytes 3 apart (4.0 -> 2.7 ms at 1344^2)
    out = np.empty((gh // m, gw // m, m, m, C, p, p), np.uint8)
    for c in range(C):
        plane = np.ascontiguousarray(u8[..., c]).reshape(gh // m, m, p, gw // m, m, p)
        out[:, :, :, :, c] = plane.transpose(0, 3, 1, 4, 2, 5)
    return out.reshape(gh * gw, C, p * p)


@functools.lru_cache(maxsize=16)
def _byte_table(s: Qwen2VLImageSettings) -> np.ndarray:
    """(C, 256) float32: HF's rescale -> normalize -> float32 applied to every byte value, with
    HF's dtypes and order (transformers.image_transforms.rescale / normalize)."""
    x = np.broadcast_to(np.arange(256, dtype=np.uint8), (CHANNELS, 256))
    if s.do_rescale:
        x = (x.astype(np.float64) * s.rescale_factor).astype(np.float32)
    if s.do_normalize:
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32)
        mean = np.array(s.image_mean, dtype=x.dtype)[:, None]
        std = np.array(s.image_std, dtype=x.dtype)[:, None]
        x = (x - mean) / std
    table = np.asarray(x, dtype=np.float32)  # HF's patchify: np.asarray(image, float32)
    table.setflags(write=False)
    return table


def _pixel_budget(size) -> tuple[int, int] | None:
    """(shortest_edge, longest_edge) from a `size` holding exactly those two keys, else None."""
    if isinstance(size, dict):
        items = {k: v for k, v in size.items() if v is not None}
    else:  # HF's SizeDict: iterates its non-None (key, value) pairs
        try:
            items = dict(size)
        except (TypeError, ValueError):
            return None
    if set(items) != {"shortest_edge", "longest_edge"}:
        return None
    lo, hi = items["shortest_edge"], items["longest_edge"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)):
        return None
    return lo, hi


def _per_channel(value) -> tuple[float, ...] | None:
    """HF's normalize: a scalar is repeated per channel, a collection must have one per channel."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),) * CHANNELS
    if isinstance(value, (list, tuple)) and len(value) == CHANNELS:
        if all(isinstance(v, (int, float)) for v in value):
            return tuple(float(v) for v in value)
    return None
