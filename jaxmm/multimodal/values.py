"""Values of multimodal items as prompts give them: arrays and tensors, base64 payloads,
lists of items or of frames, grid-split embeddings, per-prompt limits and media options.
Plain Python + numpy; the front end (`inputs.py`) classifies and loads items with these."""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image

MEDIA_IO_OPTIONS = {
    "image": ("rgba_background_color",),
    "video": ("num_frames", "frame_recovery", "fps"),
}


def to_numpy(x) -> np.ndarray:
    """A numpy / torch / JAX array -> float32 numpy (bfloat16 included)."""
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().to("cpu").float().numpy()
    return np.asarray(x).astype(np.float32)


def _is_tensor(x) -> bool:
    """torch / JAX arrays (not numpy): vLLM treats float ones as precomputed embeddings."""
    if isinstance(x, np.ndarray):
        return False
    return hasattr(x, "detach") or (hasattr(x, "__array__") and hasattr(x, "shape"))


def _is_int_tensor(x) -> bool:
    """A uint8 (or other integer) torch / JAX array: pixels, such as a (T, H, W, 3) video."""
    if not _is_tensor(x):
        return False
    dtype = x.dtype
    if hasattr(dtype, "is_floating_point"):  # torch.dtype
        return not (dtype.is_floating_point or dtype.is_complex)
    return np.issubdtype(np.dtype(dtype), np.integer) or np.dtype(dtype) == np.bool_


def _media_value(x):
    """Integer tensors -> numpy arrays (also as the frames of a (frames, metadata) pair or
    in a list of frames), so media loading sees only PIL images, numpy, URLs and bytes."""
    if _is_int_tensor(x):
        return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    if isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], dict):
        return (_media_value(x[0]), x[1])
    if isinstance(x, list):
        return [_media_value(v) for v in x]
    return x


def _looks_like_embeds(x) -> bool:
    if _is_tensor(x):
        return not _is_int_tensor(x)  # float tensors are embeddings; integer ones pixels
    if isinstance(x, np.ndarray):
        if np.issubdtype(x.dtype, np.floating) and x.ndim == 2:
            return True
        return np.issubdtype(x.dtype, np.floating) and x.ndim == 3 and x.shape[-1] not in (1, 3, 4)
    return False


def decode_embeds_payload(data: str) -> np.ndarray:
    """A base64 string holding a .npy array (or a `torch.save`d tensor) -> float32 array."""
    return to_numpy(decode_tensor_payload(data, "embeddings"))


def decode_tensor_payload(data: str, what: str = "a tensor") -> np.ndarray:
    """A base64 string holding a .npy array or a `torch.save`d tensor (how vLLM's clients
    send tensors) -> a numpy array of its own dtype (bfloat16 as float32)."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{what} given as a string must be base64: {e}") from None
    if raw[:6] == b"\x93NUMPY":
        return np.load(io.BytesIO(raw), allow_pickle=False)
    if raw[:2] == b"PK":
        import torch

        x = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"base64 {what} must hold a tensor, got {type(x).__name__}")
        return x.numpy() if not x.dtype.is_floating_point else to_numpy(x)
    raise ValueError(f"base64 {what} must hold a .npy array or a torch.save'd tensor")


def _grid_array(value) -> np.ndarray:
    """A grid_thw as given (ints, list, numpy / torch array, base64 tensor) -> int64 array."""
    if isinstance(value, str):
        value = decode_tensor_payload(value, "a grid_thw")
    elif hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value).astype(np.int64)


def _split_by_grid(values: list, modality: str) -> list:
    """Embedding dicts of several items -> one dict per item: vLLM's Qwen2-VL form
    {"image_embeds": (total, D), "image_grid_thw": (N, 3)} holds N items whose rows follow
    one another, each t*h*w / merge_size**2 rows, i.e. in proportion to its grid's size."""
    key, grid_key = f"{modality}_embeds", f"{modality}_grid_thw"
    out = []
    for v in values:
        grids = None
        if isinstance(v, dict) and key in v and v.get(grid_key) is not None:
            grids = _grid_array(v[grid_key])
        if grids is None or grids.ndim != 2 or len(grids) < 2:
            out.append(v)
            continue
        if grids.shape[1] != 3:
            raise ValueError(f"{grid_key} must be (N, 3) for N items; got {grids.shape}")
        embeds = v[key]
        embeds = decode_embeds_payload(embeds) if isinstance(embeds, str) else to_numpy(embeds)
        sizes = grids.prod(axis=1)
        if embeds.ndim != 2 or ((len(embeds) * sizes) % sizes.sum()).any():
            raise ValueError(
                f"{key} of shape {embeds.shape} cannot be split over the {len(grids)} items of "
                f"{grid_key}: give (total rows, D) with each item's rows in proportion to t*h*w"
            )
        seconds = v.get("second_per_grid_ts", v.get("second_per_grid_t"))
        if seconds is not None:
            seconds = np.broadcast_to(to_numpy(seconds).reshape(-1), (len(grids),))
        rows = len(embeds) * sizes // sizes.sum()
        for i, part in enumerate(np.split(embeds, np.cumsum(rows)[:-1])):
            item = {key: part, grid_key: grids[i]}
            if seconds is not None:
                item["second_per_grid_t"] = float(seconds[i])
            out.append(item)
    return out


def _split_batched_embeds(values: list) -> list:
    out = []
    for v in values:
        if _looks_like_embeds(v) and np.ndim(v) == 3:
            out.extend(list(to_numpy(v)))  # (N, n, D): N items
        else:
            out.append(v)
    return out


def _as_list(value) -> list:
    return list(value) if isinstance(value, list) else [value]


def _is_frame(x) -> bool:
    """One video frame: a PIL image, or an (H, W, C) / integer (H, W) array."""
    if isinstance(x, Image.Image):
        return True
    if _is_tensor(x):
        return _is_int_tensor(x) and len(x.shape) in (2, 3)
    if not isinstance(x, np.ndarray) or _looks_like_embeds(x):
        return False
    return x.ndim == 3 or (x.ndim == 2 and np.issubdtype(x.dtype, np.integer))


def _video_list(value) -> list:
    """The videos of a "video" entry: a list of frames is one video (vLLM's form), a list
    of (T, H, W, 3) arrays, frame lists, URLs, ... one video each."""
    if isinstance(value, list) and value and all(_is_frame(v) for v in value):
        return [value]
    return _as_list(value)


def _check_media_io_kwargs(kwargs: dict | None) -> dict:
    kwargs = dict(kwargs or {})
    for modality, opts in kwargs.items():
        if modality == "audio":
            continue
        if modality not in MEDIA_IO_OPTIONS:
            raise ValueError(
                f"media_io_kwargs has an unknown modality {modality!r}; known: "
                + ", ".join(sorted(MEDIA_IO_OPTIONS))
            )
        if not isinstance(opts, dict):
            raise ValueError(
                f"media_io_kwargs[{modality!r}] must be a dict, got {type(opts).__name__}"
            )
        unknown = sorted(set(opts) - set(MEDIA_IO_OPTIONS[modality]))
        if unknown:
            raise ValueError(
                f"media_io_kwargs[{modality!r}] has unknown options {unknown}; allowed: "
                + ", ".join(MEDIA_IO_OPTIONS[modality])
            )
    return kwargs


def _limit(limits: dict, modality: str) -> int | None:
    value = limits.get(modality)
    if value is None:
        return None
    if isinstance(value, dict):  # vLLM's {"count": n, "width": ..., ...}
        value = value.get("count")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"limit_mm_per_prompt[{modality!r}] must be an int >= 0, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------
# The front end, one per engine
