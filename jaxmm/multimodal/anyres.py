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


def process_image(image_processor, image, kwargs: dict, fast: bool = True) -> dict:
    """One RGB image -> {"pixel_values" (tiles, C, S, S), "grid_thw": None, "image_size":
    (height, width), "tiled": bool}, as the HF image processor makes it: float32, or uint8
    with a "byte_table" (C, 256) of their values (`pixel_values` applies it).

    kwargs: the processor's call options; `MULTI_IMAGE` true gives a single padded tile
    (the image shares its prompt with others), else the image is tiled. `fast`: the same
    pixels from Pillow and a byte table (`_fast_pixels`) where the settings allow; HF's
    own processor otherwise."""
    global _TINY
    kw = dict(kwargs)
    tiled = not kw.pop(MULTI_IMAGE, False)
    size = (image.height, image.width)
    settings = _fast_settings(image_processor, kw, image) if fast else None
    pixels = settings and _fast_pixels(image, settings, tiled)
    if pixels is not None:  # bytes + their values: the tower looks them up on the device
        out = {"pixel_values": pixels, "byte_table": settings["table"], "grid_thw": None}
        return {**out, "image_size": size, "tiled": tiled}
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


# HF's PIL processor on a 896x896 image: 370 ms on a 2-core dev CPU (float64 rescale and
# per-tile passes); Pillow's resize on the uint8 image and a byte table give its values


def _fast_settings(ip, kw: dict, image) -> dict | None:
    """What `_fast_pixels` needs of HF's `LlavaOnevisionImageProcessorPil`, or None where it
    does not reproduce it (other classes, call-time options, non-RGB images, ...)."""
    if kw or type(ip).__name__ != "LlavaOnevisionImageProcessorPil" or image.mode != "RGB":
        return None
    if not (ip.do_resize and ip.do_rescale and ip.do_normalize) or ip.do_center_crop:
        return None
    size, crop = ip.size, ip.crop_size
    height, width = (
        getattr(size, k, None) if not isinstance(size, dict) else size.get(k)
        for k in ("height", "width")
    )
    if not height or height != width or (crop is not None and getattr(crop, "height", None)):
        return None
    mean = np.asarray(ip.image_mean, np.float32).reshape(-1)
    std = np.asarray(ip.image_std, np.float32).reshape(-1)
    if mean.shape != (3,) or std.shape != (3,):
        return None
    # HF: float64 rescale cast to float32, then (x - mean) / std in float32
    x = (np.arange(256, dtype=np.float64) * ip.rescale_factor).astype(np.float32)
    table = (x[None] - mean[:, None]) / std[:, None]
    return {
        "tile": int(height),
        "resample": int(ip.resample),
        "pinpoints": ip.image_grid_pinpoints,
        "background": tuple(int(v * 255) for v in ip.image_mean),
        "table": table,
    }


def _patch_output_size(h: int, w: int, th: int, tw: int) -> tuple[int, int]:
    """The size an (h, w) image is resized to so that it fits (th, tw), as HF's
    `get_patch_output_size` computes it."""
    scale_w, scale_h = tw / w, th / h
    if scale_w < scale_h:
        return min(math.ceil(h * scale_w), th), tw
    return th, min(math.ceil(w * scale_h), tw)


def _fast_pixels(image, s: dict, tiled: bool) -> np.ndarray | None:
    """The bytes behind HF's pixel values of one RGB PIL image (tiles, C, S, S) uint8 (their
    values: `s["table"]`), or None where the layout is not the usual."""
    from PIL import Image

    S, resample, W, H = s["tile"], s["resample"], image.width, image.height
    if tiled:
        th, tw = select_best_resolution(H, W, s["pinpoints"])
        nh, nw = _patch_output_size(H, W, th, tw)
        resized = np.asarray(image.resize((nw, nh), resample))
        ph, pw = _patch_output_size(nh, nw, th, tw)  # HF pads by the resized image's own
        top, extra_y = divmod(th - ph, 2)
        left, extra_x = divmod(tw - pw, 2)
        pad = ((top, top + extra_y), (left, left + extra_x), (0, 0))
        padded = np.pad(resized, pad)
        if padded.shape[:2] != (th, tw) or th % S or tw % S:
            return None
        tiles = padded.reshape(th // S, S, tw // S, S, 3).transpose(0, 2, 1, 3, 4)
        base = np.asarray(image.resize((S, S), resample))
        u8 = np.concatenate([base[None], tiles.reshape(-1, S, S, 3)])
    else:  # padded to a square with the mean colour, then one tile
        if H != W:
            m = max(H, W)
            square = np.empty((m, m, 3), np.uint8)
            square[:] = s["background"]
            a = np.asarray(image)
            if W > H:
                square[(m - H) // 2 : (m - H) // 2 + H] = a
            else:
                square[:, (m - W) // 2 : (m - W) // 2 + W] = a
            image = Image.fromarray(square)
        u8 = np.asarray(image.resize((S, S), resample))[None]
    return np.ascontiguousarray(u8.transpose(0, 3, 1, 2))  # (tiles, C, S, S) bytes


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
    """(T, H, W, 3) uint8 frames -> {"pixel_values" (T, C, h, w) uint8, "byte_table" (C, 256)
    float32 (the values of each byte), "grid_thw": None}:
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
    chw = np.ascontiguousarray(frames.transpose(0, 3, 1, 2))  # (T, C, h, w) bytes
    # the tower looks each byte's value up on the device (`pixel_values` gives it here)
    return {"pixel_values": chw, "byte_table": table.astype(np.float32), "grid_thw": None}


def pixel_values(item: dict) -> np.ndarray:
    """An item's float32 pixel values, its byte table applied where it has one."""
    pixels, table = item["pixel_values"], item.get("byte_table")
    if table is None:
        return np.asarray(pixels, np.float32)
    return table[np.arange(len(table))[None, :, None, None], pixels]
