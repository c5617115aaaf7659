"""Pixels for the vision towers, from the checkpoint's HF image processor. Plain Python, no JAX.

The image processor is `AutoImageProcessor` from the model directory (transformers picks
its PIL backend where torchvision is absent). The directory holds the processor's configs in
either of the layouts transformers writes (`processor_configs`): one `processor_config.json`
with each sub-processor nested under its name (5.x `processor.save_pretrained`), or a file per
sub-processor (`preprocessor_config.json`, `video_preprocessor_config.json`: 4.x, and each
sub-processor's own `save_pretrained`). Two layouts of pixels come out of it:
- fixed-size towers (CLIP, LLaVA): `pixel_values` (C, H, W) per image;
- patch towers (Qwen2-VL / Qwen2.5-VL): `pixel_values` (n, C*tp*p*p) flattened patches plus
  `grid_thw` = (t, h, w) in patches.
Videos (patch towers only) take the path of HF's video processor
(`Qwen2VLVideoProcessor`), which is not the image processor frame by frame: torch's
uint8 resize, float32 normalisation, its own defaults (`video_pixels.py`, numpy only;
HF's needs torchvision). Placeholder expansion is the front end's
(`inputs.py`), from the model's token counts, so images, cached items and precomputed
embeddings all expand the same way.

Images for HF's PIL Qwen2-VL processor take `fast_image.py` instead: the same bytes from a
uint8 patchify and a per-byte table, without HF's float64 passes (issue #4; 2.6 -> 1.1 ms at
448² on a dev CPU). Any other class (the torchvision backend included) or setting goes to HF.
With `patch_bytes` (the front end sets it for towers that declare `mm_patch_bytes`, i.e.
Qwen2-VL's), those images keep their pixel values as `fast_image.PatchBytes` (uint8 patches +
the byte table), which the tower expands on the device; HF's output stays float32.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from . import anyres, fast_image, qwen3_video, video_pixels

# the rate transformers' VideoMetadata assumes of frames that come without one
UNKNOWN_VIDEO_FPS = 24.0

PROCESSOR_CONFIG = "processor_config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"  # image processor or audio feature extractor
VIDEO_PREPROCESSOR_CONFIG = "video_preprocessor_config.json"
# where each sub-processor's own config lives in the file-per-sub-processor layout
_SEPARATE_FILES = {
    "image_processor": PREPROCESSOR_CONFIG,
    "feature_extractor": PREPROCESSOR_CONFIG,
    "video_processor": VIDEO_PREPROCESSOR_CONFIG,
}


def processor_configs(path: str) -> dict[str, dict]:
    """The checkpoint's HF sub-processor configs by name ("image_processor",
    "video_processor", "feature_extractor"), from either layout transformers writes:

    - 5.x `processor.save_pretrained`: one `processor_config.json` holding every
      sub-processor's config under its name (a feature extractor may be "audio_processor");
    - 4.x `processor.save_pretrained`, and any sub-processor's own `save_pretrained`:
      `preprocessor_config.json` (the image processor or the feature extractor),
      `video_preprocessor_config.json`, and at most a flat `processor_config.json` of the
      processor's own settings (LLaVA's patch_size, ...), which names no sub-processor.

    A nested config wins over a separate file, as in transformers' own loaders."""
    out: dict[str, dict] = {}
    nested = _read_json(os.path.join(path, PROCESSOR_CONFIG)) or {}
    for name, value in nested.items():
        if isinstance(value, dict) and name.endswith(("_processor", "_extractor")):
            out["feature_extractor" if name == "audio_processor" else name] = value
    for name, filename in _SEPARATE_FILES.items():
        if name not in out:
            config = _read_json(os.path.join(path, filename))
            if config is not None:
                out[name] = config
    return out


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        value = json.load(f)
    return value if isinstance(value, dict) else None


class MultimodalProcessor:
    def __init__(
        self,
        image_processor,
        video_config: dict | None = None,
        kwargs: dict | None = None,
        fast_images: bool = True,
        patch_bytes: bool = False,
    ):
        self.image_processor = image_processor
        self.video_config = dict(video_config or {})
        self.kwargs = dict(kwargs or {})  # engine-level mm_processor_kwargs
        self.fast_images = fast_images  # fast_image.py where it reproduces HF; False: always HF
        self.patch_bytes = patch_bytes  # fast_image's pixel values as PatchBytes, not float32

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        kwargs: dict | None = None,
        image_backend: str | None = "pil",
        patch_bytes: bool = False,
    ) -> MultimodalProcessor:
        """`image_backend` ("pil" / "torchvision") is passed to `AutoImageProcessor`; None keeps
        transformers' choice (torchvision where installed). The default is HF's PIL backend:
        the same pixels with or without torchvision installed (the parity tests' reference),
        and the one `fast_image.py` reproduces byte for byte. A transformers version without
        the `backend` argument gets its default class. `patch_bytes`: see the class."""
        # from its module, not the package root: 5.17's root lists AutoImageProcessor as needing
        # torchvision (its file imports TorchvisionBackend, in one function) and hands out a stub
        # without it; the class itself needs only PIL (fixed by 5.20.0)
        from transformers.models.auto.image_processing_auto import AutoImageProcessor

        configs = processor_configs(path)
        if "image_processor" not in configs:
            raise ValueError(
                f"{path!r} has no image processor config: a multimodal checkpoint needs "
                f"{PREPROCESSOR_CONFIG} or a {PROCESSOR_CONFIG} with an 'image_processor' entry "
                "next to config.json (what the processor's save_pretrained writes)"
            )
        try:
            image_processor = None
            if image_backend:
                try:
                    image_processor = AutoImageProcessor.from_pretrained(
                        path, local_files_only=True, backend=image_backend
                    )
                except (TypeError, ValueError):  # no such argument in this transformers
                    image_processor = None
            if image_processor is None:
                image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        except OSError as e:
            if not os.path.exists(os.path.join(path, PREPROCESSOR_CONFIG)):
                # transformers before 5.0 reads no nested sub-processor configs
                raise ValueError(
                    f"{path!r} keeps its image processor config inside {PROCESSOR_CONFIG} "
                    "(transformers 5 layout), which this transformers cannot read: upgrade "
                    f"transformers, or save the image processor to {PREPROCESSOR_CONFIG}"
                ) from e
            raise
        return cls(image_processor, configs.get("video_processor"), kwargs, patch_bytes=patch_bytes)

    @property
    def patches(self) -> bool:
        """Whether this is a patch tower (grid_thw) rather than a fixed-size one."""
        ip = self.image_processor
        return hasattr(ip, "temporal_patch_size") and hasattr(ip, "merge_size")

    def _call_kwargs(self, overrides: dict | None, base: dict | None = None) -> dict:
        kw = {**(base or {}), **self.kwargs, **(overrides or {})}
        # Qwen-style pixel budgets: the legacy names map onto the `size` dict
        lo, hi = kw.pop("min_pixels", None), kw.pop("max_pixels", None)
        if lo is not None or hi is not None:
            size = _size_dict(kw.get("size") or self.image_processor.size)
            if lo is not None:
                size["shortest_edge"] = int(lo)
            if hi is not None:
                size["longest_edge"] = int(hi)
            kw["size"] = size
        kw.pop("fps", None)  # a video sampling option, not the image processor's
        kw.pop("use_audio_in_video", None)  # shapes the prompt (Qwen2.5-Omni), not the pixels
        kw.pop("unknown_video_fps", None)  # a video's rate when it comes without one
        return kw

    def image(self, image: Image.Image, overrides: dict | None = None) -> dict:
        """One RGB image -> {"pixel_values", "grid_thw"} (grid_thw None for fixed-size towers).

        pixel_values: float32, or a `fast_image.PatchBytes` standing for it (`patch_bytes`)."""
        kw = self._call_kwargs(overrides, pan_and_scan_defaults(self.image_processor))
        if anyres.takes(self.image_processor):  # tiles by pinpoints (LLaVA-OneVision)
            return anyres.process_image(self.image_processor, image, kw, self.fast_images)
        out = None
        if self.fast_images and self.patches:
            settings = fast_image.settings_for(self.image_processor, kw)
            out = settings and fast_image.preprocess([image], settings, self.patch_bytes)
        if out is None:
            out = self.image_processor(images=[image], return_tensors="np", **kw)
        pixels = out["pixel_values"]
        if not isinstance(pixels, fast_image.PatchBytes):
            pixels = np.asarray(pixels, np.float32)
        if not self.patches:
            item = {"pixel_values": pixels[0], "grid_thw": None}
            # Gemma 3's pan-and-scan: the image, then its crops, one item (num_crops > 0 only,
            # so that an image without crops stays what it always was)
            crops = int(np.asarray(out.get("num_crops", 0)).reshape(-1)[0])
            if crops:
                item["pixel_values"] = pixels[: 1 + crops]
                item["num_crops"] = crops
            # NaViT-packed sub-images (MiniCPM-V): each one's patch grid, and the slice grid
            for key in ("target_sizes", "grids"):
                if key in out:
                    item[key] = np.asarray(out[key])
            if "image_position_ids" in out:  # Gemma 4: each patch's (x, y), -1 on padding
                item["image_position_ids"] = np.asarray(out["image_position_ids"])[0]
            return item
        grid = tuple(int(g) for g in np.asarray(out["image_grid_thw"])[0])
        return {"pixel_values": pixels, "grid_thw": grid}

    def video(
        self, frames: np.ndarray, fps: float | None = None, overrides: dict | None = None
    ) -> dict:
        """(T, H, W, 3) uint8 frames -> {"pixel_values", "grid_thw", "second_per_grid_t"}.

        `fps` is the rate of the frames as given; None (unknown) is taken as 24, as HF's video
        metadata does (`VideoMetadata.sampled_fps`), so that Qwen2.5-VL places them in time
        the way transformers' own processor does."""
        if anyres.takes(self.image_processor):  # a tile per frame (LLaVA-OneVision)
            overrides = {**self.kwargs, **(overrides or {})}
            return anyres.process_video(frames, anyres.video_settings(self.video_config, overrides))
        if not self.patches:
            raise ValueError("this model's image processor takes no videos")
        if qwen3_video.is_qwen3_video(self.video_config):  # frames sampled, times kept
            kw = {**self.kwargs, **(overrides or {})}
            return qwen3_video.preprocess(np.asarray(frames), fps, self.video_config, kw)
        settings = video_pixels.VideoSettings.from_dict(
            self._video_config(), {**self.kwargs, **(overrides or {})}
        )
        pixels, grid = video_pixels.preprocess(np.asarray(frames), settings)
        # a model whose processor assumes its own rate says so (Qwen2.5-Omni: 2 fps)
        unknown = {**self.kwargs, **(overrides or {})}.get("unknown_video_fps")
        fps = float(fps) if fps else float(unknown or UNKNOWN_VIDEO_FPS)
        tp = settings.temporal_patch_size
        return {"pixel_values": pixels, "grid_thw": grid, "second_per_grid_t": tp / fps}

    def _video_config(self) -> dict:
        """The video processor's settings, as transformers builds it: from the checkpoint's
        video processor config when it has one, else from the image processor's."""
        if self.video_config:
            return self.video_config
        ip = self.image_processor
        return {k: getattr(ip, k) for k in video_pixels.SETTINGS if hasattr(ip, k)}


# Gemma3Processor's own image kwargs, which it passes when the checkpoint's image processor
# config leaves them null (as released Gemma 3 checkpoints do); the image processor alone
# has no defaults for them
_PAN_AND_SCAN_DEFAULTS = {
    "do_pan_and_scan": False,
    "pan_and_scan_min_crop_size": 256,
    "pan_and_scan_max_num_crops": 4,
    "pan_and_scan_min_ratio_to_activate": 1.2,
}


def pan_and_scan_defaults(image_processor) -> dict:
    """Gemma3Processor's pan-and-scan settings that the image processor leaves unset."""
    if not hasattr(image_processor, "pan_and_scan_min_crop_size"):
        return {}
    return {k: v for k, v in _PAN_AND_SCAN_DEFAULTS.items() if getattr(image_processor, k) is None}


def _size_dict(size) -> dict:
    if size is None:
        return {}
    if isinstance(size, dict):
        out = {k: v for k, v in size.items() if v is not None}
        # older configs spell the pixel budget min_pixels / max_pixels inside `size`
        if "min_pixels" in out:
            out.setdefault("shortest_edge", out.pop("min_pixels"))
        if "max_pixels" in out:
            out.setdefault("longest_edge", out.pop("max_pixels"))
        return out
    keys = ("height", "width", "shortest_edge", "longest_edge")
    return {k: getattr(size, k) for k in keys if getattr(size, k, None) is not None}
