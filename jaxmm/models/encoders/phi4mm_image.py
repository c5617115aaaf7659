"""Phi-4-multimodal's image preprocessing (HD crops), host-only: numpy and Pillow, no JAX.

What `Phi4MultimodalImageProcessor` computes (transformers ships it for torchvision only),
for one RGB image, with S the crop size (`size`), p the patch size and M = S / p:
1. crops: the image covers ceil(w / S) x ceil(h / S) crops, or, past `dynamic_hd` crops, the
   grid of at most that many whose aspect ratio is closest (ties: the larger grid when the
   image covers more than half of it); it is resized (bilinear, antialiased, uint8) to fit
   the grid keeping its aspect ratio, padded white on the right or bottom, and cut into
   S x S crops in row-major order;
2. a mask of M x M patches per crop: 0 over whole patches of padding;
3. pixels: rescaled and normalised; the global view is the padded image resized to S x S
   (bicubic, no antialiasing, of the normalised pixels) and goes first;
4. tokens: 256 + 1 + 16 for the global view (its 16 x 16 pooled features, a newline per row,
   a separator) + the pooled features left by the mask + a newline per row of them.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

DEFAULTS = {
    "size": {"height": 448, "width": 448},
    "patch_size": 14,
    "dynamic_hd": 36,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "rescale_factor": 1 / 255,
}


def settings(config: dict | None, overrides: dict | None = None) -> dict:
    """The image processor's settings: its saved config over transformers' defaults, then
    per-request `mm_processor_kwargs` (size, patch_size, dynamic_hd)."""
    out = dict(DEFAULTS)
    out.update({k: v for k, v in (config or {}).items() if k in DEFAULTS and v is not None})
    unknown = sorted(set(overrides or {}) - {"size", "patch_size", "dynamic_hd"})
    if unknown:
        raise ValueError(f"Phi-4-multimodal takes no image processor options {unknown}")
    out.update(overrides or {})
    size = out["size"]
    if isinstance(size, dict):
        if size.get("height") != size.get("width"):
            raise ValueError("Phi-4-multimodal's image processor takes square sizes only")
        size = size["height"]
    out["size"] = int(size)
    return out


def closest_aspect_ratio(aspect: float, ratios: list, width: int, height: int, S: int):
    best, best_diff = (1, 1), float("inf")
    area = width * height
    for ratio in ratios:
        diff = abs(aspect - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and area > 0.5 * S * S * ratio[0] * ratio[1]:
            best = ratio
    return best


def _grid(width: int, height: int, S: int, max_num: int) -> tuple[int, int]:
    """(crops across, crops down) of an image."""
    w_crops, h_crops = math.ceil(width / S), math.ceil(height / S)
    if w_crops * h_crops <= max_num:
        return w_crops, h_crops
    # the same set, sorted the same way, as transformers (ties keep the set's order)
    ratios = {
        (i, j)
        for n in range(1, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if 1 <= i * j <= max_num
    }
    ratios = sorted(ratios, key=lambda r: r[0] * r[1])
    return closest_aspect_ratio(width / height, ratios, width, height, S)


def _cubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) bicubic interpolation matrix (A = -0.75, half-pixel centres, edges clamped)
    as torch's `upsample_bicubic2d` with align_corners=False."""
    A = -0.75
    scale = in_size / out_size
    W = np.zeros((out_size, in_size), np.float64)
    for o in range(out_size):
        src = scale * (o + 0.5) - 0.5
        i0 = math.floor(src)
        t = src - i0
        ws = [
            ((A * (t + 1) - 5 * A) * (t + 1) + 8 * A) * (t + 1) - 4 * A,
            ((A + 2) * t - (A + 3)) * t * t + 1,
            ((A + 2) * (1 - t) - (A + 3)) * (1 - t) * (1 - t) + 1,
            ((A * (2 - t) - 5 * A) * (2 - t) + 8 * A) * (2 - t) - 4 * A,
        ]
        for k, w in enumerate(ws):
            W[o, min(max(i0 - 1 + k, 0), in_size - 1)] += w
    return W


def _resize_bilinear(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w, 3) uint8 -> (height, width, 3) uint8, antialiased bilinear: torch's uint8 kernel
    (what torchvision runs for transformers) where torch is installed, else Pillow's, which
    it was ported from (the two differ by one level at a few pixels)."""
    try:
        import torch
    except ImportError:
        return np.asarray(Image.fromarray(pixels).resize((width, height), Image.BILINEAR))
    x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None]
    y = torch.nn.functional.interpolate(
        x, size=(height, width), mode="bilinear", align_corners=False, antialias=True
    )
    return y[0].permute(1, 2, 0).numpy()


def preprocess(image: Image.Image, config: dict) -> dict:
    """One RGB image -> {"image_pixel_values" (1 + crops, 3, S, S) float32,
    "image_attention_mask" (1 + crops, M, M) uint8, "image_size" (h, w) of the padded image,
    "num_img_tokens"}; `config` from `settings`."""
    S, p, max_num = config["size"], int(config["patch_size"]), int(config["dynamic_hd"])
    M = S // p
    image = image.convert("RGB")
    width, height = image.size
    gw, gh = _grid(width, height, S, max_num)
    tw, th = S * gw, S * gh
    if tw / width < th / height:
        new_w, new_h = tw, int(height * (tw / width))
    else:
        new_w, new_h = int(width * (th / height)), th
    pad_w, pad_h = tw - new_w, th - new_h
    if min(new_h, th) < 10 or min(new_w, tw) < 10:
        raise ValueError(f"the aspect ratio is very extreme {(new_w, new_h)}")
    mask = np.ones((M * gh, M * gw), np.uint8)
    if pad_w >= p:
        mask[:, -(pad_w // p) :] = 0
    if pad_h >= p:
        mask[-(pad_h // p) :, :] = 0
    canvas = np.full((th, tw, 3), 255, np.uint8)
    canvas[:new_h, :new_w] = _resize_bilinear(np.asarray(image), new_h, new_w)
    mean = np.asarray(config["image_mean"], np.float32)[:, None, None]
    std = np.asarray(config["image_std"], np.float32)[:, None, None]
    scale = np.float32(config["rescale_factor"])
    pixels = (canvas.transpose(2, 0, 1).astype(np.float32) * scale - mean) / std  # (3, th, tw)
    # (S, th) @ (3, th, tw) @ (tw, S): the separable bicubic resize as two matmuls
    glob = (_cubic_weights(th, S) @ pixels.astype(np.float64) @ _cubic_weights(tw, S).T).astype(
        np.float32
    )
    crops = pixels.reshape(3, gh, S, gw, S).transpose(1, 3, 0, 2, 4).reshape(-1, 3, S, S)
    crop_masks = mask.reshape(gh, M, gw, M).transpose(0, 2, 1, 3).reshape(-1, M, M)
    pooled = mask[0::2, 0::2]  # one pooled feature per 2 x 2 patches
    num_tokens = 256 + 1 + int(pooled.sum()) + int(pooled[:, 0].sum()) + 16
    return {
        "image_pixel_values": np.concatenate([glob[None], crops]),
        "image_attention_mask": np.concatenate([np.ones((1, M, M), np.uint8), crop_masks]),
        "image_size": (th, tw),
        "num_img_tokens": num_tokens,
    }
