"""LLaVA-OneVision's host side: anyres tiling, token counts, video pixels. Numpy, no JAX.

An image alone in its prompt is tiled ("anyres"), as transformers' `LlavaOnevisionProcessor`
and model do it:

1. the checkpoint's `image_grid_pinpoints` (pixel (height, width) pairs) are scored against
   the image; the one keeping the most of its pixels, then wasting the fewest, wins
   (`select_best_resolution`);
2. the image is resized to fit that resolution and padded to it, then cut into tiles of the
   tower's input size; a resized copy of the whole image comes first (the "base" tile);
3. on the model side, the tiles' patch features are stitched back into one
   (grid_h * side, grid_w * side) map, the rows or columns that were padding are cut off
   (`TileLayout.crop`), and a map larger than `anyres_max_N` tiles' worth of patches (by a
   factor over 1.1) is shrunk with a bilinear resize (`vision_aspect_ratio`);
4. an `image_newline` embedding closes every row; the base tile's features go first, with
   no newlines.

An image that shares its prompt with other images is not tiled: it is padded to a square
(with the mean colour) and resized to one tile, whose features get one newline at the end.
Which of the two an image gets depends on the prompt, so the front end tells the processor
whether the prompt holds several images (`MULTI_IMAGE`, from the model's
`mm_prompt_processor_kwargs`), as transformers' chat template path does (the images of one
conversation are one sample). A prompt's `mm_processor_kwargs={"multi_image": False}` tiles
every image instead, as transformers' processor does with images given as a flat list.

Videos: every frame is resized to one tile (torch's uint8 resize, as transformers' video
processor does it), its patch map is halved with a bilinear resize (ceil), and one newline
closes the whole video.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import video_pixels

# the processor option the front end sets for an image that shares its prompt with others
MULTI_IMAGE = "multi_image"
# HF LlavaOnevisionVideoProcessor's class attributes: what a video config leaves unsaid
VIDEO_DEFAULTS = {
    "do_resize": True,
    "size": {"height": 384, "width": 384},
    "resample": 3,  # bicubic
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],  # OPENAI_CLIP_MEAN
    "image_std": [0.26862954, 0.26130258, 0.27577711],  # OPENAI_CLIP_STD
}
_FILTERS = {2: "bilinear", 3: "bicubic"}
_TINY = None  # a 1x1 image: the second image that makes the HF processor skip tiling


def select_best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """The pinpoint (height, width) that keeps the most of the image's pixels once it is
    scaled to fit, then wastes the fewest; the first one wins a tie."""
    best, best_kept, best_waste = None, 0, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (int(h), int(w)), kept, waste
    if best is None:
        raise ValueError(f"no image_grid_pinpoints fit an image of {height}x{width}: {pinpoints}")
    return best


def max_tiles(vision_aspect_ratio: str) -> int:
    """`anyres_max_9` -> 9: the patch budget of a tiled image, in tiles."""
    digits = vision_aspect_ratio.removeprefix("anyres_max_")
    if not digits.isdigit():
        raise ValueError(f"vision_aspect_ratio {vision_aspect_ratio!r} is not 'anyres_max_<N>'")
    return int(digits)


@dataclass(frozen=True)
class TileLayout:
    """Where an anyres image's features come from, in patches.

    grid: tiles (rows, cols) after the base tile; side: patches per tile side;
    crop: (top, bottom, left, right) of the stitched map that is image, not padding;
    out: (rows, cols) after the anyres_max resize (the crop's size when none is needed).
    """

    grid: tuple[int, int]
    side: int
    crop: tuple[int, int, int, int]
    out: tuple[int, int]

    @property
    def num_tiles(self) -> int:
        return 1 + self.grid[0] * self.grid[1]

    @property
    def resized(self) -> bool:
        top, bottom, left, right = self.crop
        return self.out != (bottom - top, right - left)

    @property
    def num_tokens(self) -> int:
        """The base tile's patches, then each output row and its newline."""
        rows, cols = self.out
        return self.side**2 + rows * (cols + 1)


def tile_layout(
    image_size: tuple[int, int], pinpoints, tile_px: int, side: int, vision_aspect_ratio: str
) -> TileLayout:
    """The layout of an anyres image of `image_size` (height, width) in pixels, for tiles of
    `tile_px` pixels and `side` x `side` patches."""
    height, width = (int(v) for v in image_size)
    best_h, best_w = select_best_resolution(height, width, pinpoints)
    grid = (best_h // tile_px, best_w // tile_px)
    rows, cols = grid[0] * side, grid[1] * side
    top, bottom, left, right = 0, rows, 0, cols
    # the resize kept the aspect ratio and centred the image: the rest is padding
    if width / height > cols / rows:
        new = int(round(height * (cols / width), 7))
        pad = (rows - new) // 2
        top, bottom = pad, rows - pad
    else:
        new = int(round(width * (rows / height), 7))
        pad = (cols - new) // 2
        left, right = pad, cols - pad
    h, w = bottom - top, right - left
    out = (h, w)
    ratio = math.sqrt(h * w / (max_tiles(vision_aspect_ratio) * side**2))
    if ratio > 1.1:
        out = (int(h // ratio), int(w // ratio))
    return TileLayout(grid, side, (top, bottom, left, right), out)


def single_tile_tokens(side: int) -> int:
    """An image among several (not tiled): its patches and one newline."""
    return side**2 + 1


def pooled_side(side: int) -> int:
    return math.ceil(side / 2)


def video_tokens(num_frames: int, side: int) -> int:
    """Each frame's pooled patches, then one newline for the whole video."""
    return num_frames * pooled_side(side) ** 2 + 1


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 weights of torch's `interpolate(mode="bilinear",
    align_corners=False)` along one axis (no antialias): output i samples the input at
    (i + 0.5) * in / out - 0.5, clamped at 0, between its two neighbours."""
    m = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    for i in range(out_size):
        src = max(scale * (i + 0.5) - 0.5, 0.0)
        lo = min(int(src), in_size - 1)
        hi = lo + 1 if lo < in_size - 1 else lo
        frac = src - lo
        m[i, lo] += 1.0 - frac
        m[i, hi] += frac
    return m.astype(np.float32)


# ---------------------------------------------------------------------------------------
# pixels


def takes(image_processor) -> bool:
    """Whether an HF image processor tiles images by pinpoints (the LLaVA-OneVision kind)."""
    return getattr(image_processor, "image_grid_pinpoints", None) is not None


def process_image(image_processor, image, kwargs: dict) -> dict:
    """One RGB image -> {"pixel_values" (tiles, C, S, S) float32, "grid_thw": None,
    "image_size": (height, width), "tiled": bool}, through the HF image processor.

    kwargs: the processor's call options; `MULTI_IMAGE` true gives a single padded tile
    (the image shares its prompt with others), else the image is tiled."""
    global _TINY
    kw = dict(kwargs)
    tiled = not kw.pop(MULTI_IMAGE, False)
    if tiled:
        out = image_processor(images=[image], return_tensors="np", **kw)
    else:
        from PIL import Image

        if _TINY is None:
            _TINY = Image.new("RGB", (1, 1))
        # the HF processor tiles an image only when it is its sample's only one: a second
        # (1x1, cheap) image in the same sample gives the multi-image pixels
        out = image_processor(images=[[image, _TINY]], return_tensors="np", **kw)
    pixels = np.asarray(out["pixel_values"][0], np.float32)
    if not tiled:
        pixels = pixels[:1]
    size = tuple(int(v) for v in np.asarray(out["image_sizes"][0]).reshape(-1)[:2])
    return {"pixel_values": pixels, "grid_thw": None, "image_size": size, "tiled": tiled}


def video_settings(video_config: dict | None, overrides: dict | None = None) -> dict:
    """The video processor's settings: its saved config over the class defaults, then
    call-time overrides (only the keys it has)."""
    out = dict(VIDEO_DEFAULTS)
    for layer in (video_config or {}, overrides or {}):
        out.update({k: v for k, v in layer.items() if k in VIDEO_DEFAULTS and v is not None})
    size = out["size"]
    if not isinstance(size, dict):  # HF's SizeDict
        size = {k: getattr(size, k, None) for k in ("height", "width", "shortest_edge")}
    if size.get("height") is None or size.get("width") is None:
        edge = size.get("shortest_edge")
        if edge is None:
            raise ValueError(f"a LLaVA-OneVision video size needs height and width, got {size}")
        size = {"height": edge, "width": edge}
    out["size"] = {"height": int(size["height"]), "width": int(size["width"])}
    if int(out["resample"]) not in _FILTERS:
        raise ValueError(f"video resample {out['resample']} is not bilinear (2) or bicubic (3)")
    return out


def process_video(frames: np.ndarray, settings: dict) -> dict:
    """(T, H, W, 3) uint8 frames -> {"pixel_values" (T, C, h, w) float32, "grid_thw": None}:
    transformers' `LlavaOnevisionVideoProcessor` (every frame kept; torch's uint8 antialiased
    resize; rescale and normalise fused in float32)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"a video must be (T, H, W, 3) uint8 frames, got {frames.shape}")
    h, w = settings["size"]["height"], settings["size"]["width"]
    if settings["do_resize"] and frames.shape[1:3] != (h, w):
        frames = video_pixels.resize_uint8(frames, h, w, _FILTERS[int(settings["resample"])])
    x = np.broadcast_to(np.arange(256, dtype=np.float32), (3, 256))
    if settings["do_normalize"]:
        mean = np.asarray(settings["image_mean"], np.float32).reshape(3, 1)
        std = np.asarray(settings["image_std"], np.float32).reshape(3, 1)
        if settings["do_rescale"]:  # fused: mean and std scaled up, in float32
            inv = np.float32(1.0 / settings["rescale_factor"])
            mean, std = mean * inv, std * inv
        table = (x - mean) / std
    elif settings["do_rescale"]:
        table = x * np.float32(settings["rescale_factor"])
    else:
        table = np.ascontiguousarray(x)
    chw = frames.transpose(0, 3, 1, 2)  # (T, C, h, w) bytes
    pixels = table[np.arange(3)[None, :, None, None], chw]
    return {"pixel_values": pixels.astype(np.float32), "grid_thw": None}
