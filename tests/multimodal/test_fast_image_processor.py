"""`fast_image.py` against HF's `Qwen2VLImageProcessorPil`: the same bytes, on a grid of inputs.

Equality is bitwise (`tobytes()`), dtypes and shapes included, for the float32 arrays made
here and for `PatchBytes` expanded on the device (as the Qwen2-VL encoder does). The timing
test prints HF vs the fast path on this CPU (not asserted: CI machines vary).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from jaxmm.multimodal import fast_image
from jaxmm.multimodal.media import _to_rgb
from jaxmm.multimodal.processor import MultimodalProcessor

pil_qwen = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
HFProcessor = pil_qwen.Qwen2VLImageProcessorPil

# Qwen2-VL-2B-Instruct's preprocessor_config.json pixel budget
CHECKPOINT_BUDGET = {"shortest_edge": 3136, "longest_edge": 12845056}
SIZES = [(1, 1), (28, 28), (448, 448), (333, 517), (1000, 200), (1344, 1344)]  # (w, h)


def _image(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Noise on top of gradients, so every byte value and every channel shows up."""
    rng = np.random.default_rng(seed + 7 * w + h)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    noise = rng.integers(-40, 41, size=(h, w, 3))
    rgb = np.clip(base + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb)
    if mode == "RGBA":
        alpha = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
        image = Image.fromarray(np.dstack([rgb, alpha]))
    elif mode == "LA":
        image = Image.fromarray(np.dstack([rgb[..., 0], rng.integers(0, 256, (h, w), np.uint8)]))
    elif mode == "L":
        image = image.convert("L")
    elif mode == "RGB+transparency":  # a PNG tRNS colour: mode RGB, transparency in info
        image.info["transparency"] = tuple(int(v) for v in rgb[0, 0])
    elif mode == "P":
        image = image.quantize(colors=64)
    elif mode == "P+transparency":
        image = image.quantize(colors=64)
        image.info["transparency"] = 3  # palette index 3 is transparent
    return image


def _hf(images, **kw) -> dict:
    out = HFProcessor(size=dict(CHECKPOINT_BUDGET))(images=images, return_tensors="np", **kw)
    return {k: np.asarray(out[k]) for k in ("pixel_values", "image_grid_thw")}


def _fast(images, **kw) -> dict:
    s = fast_image.settings_for(HFProcessor(size=dict(CHECKPOINT_BUDGET)), kw)
    assert s is not None, kw
    out = fast_image.preprocess(images, s)
    assert out is not None
    return out


def assert_bitwise(got: dict, want: dict):
    for key in ("pixel_values", "image_grid_thw"):
        g, w = got[key], want[key]
        assert g.dtype == w.dtype and g.shape == w.shape, (key, g.dtype, g.shape, w.dtype, w.shape)
        assert g.tobytes() == w.tobytes(), (key, float(np.abs(g - w).max()))


@pytest.mark.parametrize("w,h", SIZES)
def test_sizes_rgb(w, h):
    image = _image(w, h)
    assert_bitwise(_fast([image]), _hf([image]))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "P+transparency", "RGB+transparency"])
@pytest.mark.parametrize("w,h", [(333, 517), (28, 28)])
def test_modes(mode, w, h):
    image = _image(w, h, mode)
    # the raw mode: HF's convert_to_rgb (onto white from transformers 5.21: test below)
    assert_bitwise(_fast([image]), _hf([image]))
    # what the front end hands over: already composited to RGB by media._to_rgb
    rgb = _to_rgb(image, (255, 255, 255))
    assert_bitwise(_fast([rgb]), _hf([rgb]))


def test_rgb_conversion_follows_installed_transformers():
    """HF's PIL convert_to_rgb composites transparency onto white from transformers 5.21 and
    only converts ("RGB") before; the gate records which, and it is what HF's method does."""
    assert not any(fast_image.hf_composites(v) for v in ("4.57.6", "5.17.0", "5.20.2"))
    assert all(fast_image.hf_composites(v) for v in ("5.21.0", "5.23.0", "5.24.0.dev0", "6.0"))
    ip = HFProcessor()
    clear_black = Image.new("RGBA", (1, 1), (0, 0, 0, 0))
    white = bool((np.asarray(ip.convert_to_rgb(clear_black)) == 255).all())
    assert fast_image.settings_for(ip, {}).composite_transparency == white


@pytest.mark.parametrize(
    "budget",
    [
        {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280},  # the class defaults
        {"shortest_edge": 256 * 28 * 28, "longest_edge": 256 * 28 * 28},  # fixed token count
        {"shortest_edge": 28 * 28, "longest_edge": 64 * 28 * 28},
    ],
)
@pytest.mark.parametrize("w,h", [(1, 1), (448, 448), (333, 517), (1000, 200), (1344, 1344)])
def test_pixel_budgets(budget, w, h):
    image = _image(w, h)
    assert_bitwise(_fast([image], size=budget), _hf([image], size=budget))


@pytest.mark.parametrize("w,h", [(448, 448), (56, 112), (1344, 1344)])
def test_no_resize(w, h):
    image = _image(w, h)
    assert_bitwise(_fast([image], do_resize=False), _hf([image], do_resize=False))


@pytest.mark.parametrize(
    "kw",
    [
        {"do_rescale": False},
        {"do_normalize": False},
        {"do_rescale": False, "do_normalize": False},
        {"rescale_factor": 1 / 127.5, "image_mean": [0.5, 0.5, 0.5], "image_std": 0.25},
        {"resample": Image.Resampling.BILINEAR},
        {"resample": int(Image.Resampling.LANCZOS)},
        {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2},
        {"patch_size": 14, "merge_size": 1, "temporal_patch_size": 3},
        {"do_convert_rgb": False},
    ],
)
def test_settings(kw):
    image = _image(333, 517)
    assert_bitwise(_fast([image], **kw), _hf([image], **kw))


def test_batch_of_sizes():
    images = [_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    images.append(_image(333, 517, "RGBA"))
    assert_bitwise(_fast(images), _hf(images))


@pytest.fixture(scope="module")
def expand_on_device():
    """`patch_pixels` jitted as the encoder runs it: bytes, patch starts and table are inputs."""
    import jax

    from jaxmm.models.encoders.qwen2_vl_vision import patch_pixels

    return jax.jit(patch_pixels, static_argnums=3)


def _device_values(expand_on_device, images, **kw) -> np.ndarray:
    s = fast_image.settings_for(HFProcessor(size=dict(CHECKPOINT_BUDGET)), kw)
    out = fast_image.preprocess(images, s, patch_bytes=True)
    pb = out["pixel_values"]
    assert isinstance(pb, fast_image.PatchBytes) and pb.data.dtype == np.uint8
    assert np.asarray(pb).tobytes() == _fast(images, **kw)["pixel_values"].tobytes()  # host
    return np.asarray(expand_on_device(pb.data, pb.sources, pb.table, pb.temporal_patch_size))


@pytest.mark.parametrize(
    "w,h,mode",
    [(28, 28, "RGB"), (333, 517, "RGB"), (1000, 200, "RGBA"), (333, 517, "P+transparency")]
    + [(56, 84, "L"), (1344, 1344, "RGB")],
)
def test_patch_bytes_expanded_on_device_are_hf_pixel_values(expand_on_device, w, h, mode):
    image = _image(w, h, mode)
    got = _device_values(expand_on_device, [image])
    want = _hf([image])["pixel_values"]
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize(
    "kw",
    [
        {"rescale_factor": 1 / 127.5, "image_mean": [0.5, 0.5, 0.5], "image_std": 0.25},
        {"do_normalize": False},
        {"patch_size": 14, "merge_size": 1, "temporal_patch_size": 3},
    ],
)
def test_patch_bytes_expanded_on_device_with_settings(expand_on_device, kw):
    images = [_image(333, 517), _image(448, 448, seed=1)]
    assert _device_values(expand_on_device, images, **kw).tobytes() == (
        _hf(images, **kw)["pixel_values"].tobytes()
    )


def test_patch_bytes_stand_for_the_float_array():
    s = fast_image.settings_for(HFProcessor(size=dict(CHECKPOINT_BUDGET)), {})
    pb = fast_image.preprocess([_image(333, 517)], s, patch_bytes=True)["pixel_values"]
    want = _hf([_image(333, 517)])["pixel_values"]
    assert pb.shape == np.shape(pb) == want.shape and len(pb) == len(want)
    assert pb.data.nbytes * 4 * s.temporal_patch_size == want.nbytes  # a byte per value
    assert np.asarray(pb, np.float32).tobytes() == want.tobytes()
    mp = MultimodalProcessor(HFProcessor(size=dict(CHECKPOINT_BUDGET)), patch_bytes=True)
    assert isinstance(mp.image(_image(333, 517))["pixel_values"], fast_image.PatchBytes)
    odd = MultimodalProcessor(mp.image_processor, {"disable_grouping": True}, patch_bytes=True)
    assert odd.image(_image(56, 56))["pixel_values"].dtype == np.float32  # HF's path: floats


def test_smart_resize_matches_hf():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        h, w = (int(v) for v in rng.integers(1, 4000, size=2))
        lo = int(rng.integers(1, 3000)) * 4
        hi = lo + int(rng.integers(0, 2_000_000))
        if max(h, w) / min(h, w) > 200:
            continue
        want = pil_qwen.smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi)
        assert fast_image.smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi) == want


def test_gate_falls_back():
    ip = HFProcessor()
    assert fast_image.settings_for(ip, {}) is not None

    class Sub(HFProcessor):  # a subclass may change any step: HF's path
        pass

    assert fast_image.settings_for(Sub(), {}) is None
    assert fast_image.settings_for(ip, {"disable_grouping": True}) is None  # unknown key
    assert fast_image.settings_for(ip, {"size": {"height": 448, "width": 448}}) is None
    assert fast_image.settings_for(ip, {"image_mean": [0.5, 0.5]}) is None
    assert fast_image.settings_for(ip, {"resample": None}) is None
    s = fast_image.settings_for(ip, {"do_convert_rgb": False})
    assert fast_image.preprocess([_image(56, 56, "L")], s) is None  # HF keeps one channel
    s = fast_image.settings_for(ip, {"do_resize": False})
    assert fast_image.preprocess([_image(42, 56)], s) is None  # 42 % 28: HF's reshape raises
    assert fast_image.preprocess([np.zeros((56, 56, 3), np.uint8)], s) is None  # not PIL


def test_processor_wiring():
    """`MultimodalProcessor.image` gives the same arrays with and without the fast path,
    min_pixels / max_pixels overrides included (mapped onto `size` by `_call_kwargs`)."""
    ip = HFProcessor(size=dict(CHECKPOINT_BUDGET))
    fast = MultimodalProcessor(ip, kwargs={"max_pixels": 200 * 28 * 28})
    slow = MultimodalProcessor(ip, kwargs={"max_pixels": 200 * 28 * 28}, fast_images=False)
    for overrides in (None, {"min_pixels": 300 * 28 * 28, "max_pixels": 400 * 28 * 28}):
        image = _image(333, 517)
        got, want = fast.image(image, overrides), slow.image(image, overrides)
        assert got["grid_thw"] == want["grid_thw"]
        assert got["pixel_values"].tobytes() == want["pixel_values"].tobytes()
    # a kwarg the fast path does not implement still works, through HF
    odd = MultimodalProcessor(ip, kwargs={"disable_grouping": True})
    assert odd.image(_image(56, 56))["grid_thw"] == (1, 4, 4)


def _best_ms(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


@pytest.mark.parametrize("side", [448, 1344])
def test_timing(side, capsys):
    ip = HFProcessor(size=dict(CHECKPOINT_BUDGET))
    fast, slow = MultimodalProcessor(ip), MultimodalProcessor(ip, fast_images=False)
    as_bytes = MultimodalProcessor(ip, patch_bytes=True)
    image = _image(side, side)
    hf_ms = _best_ms(lambda: slow.image(image), 10)
    fast_ms = _best_ms(lambda: fast.image(image), 10)
    bytes_ms = _best_ms(lambda: as_bytes.image(image), 10)
    with capsys.disabled():
        print(
            f"\n{side}x{side}: HF {hf_ms:.2f} ms, fast_image {fast_ms:.2f} ms, "
            f"as patch bytes {bytes_ms:.2f} ms"
        )


def test_loaded_checkpoint_takes_fast_path(tmp_path):
    """Settings read back from preprocessor_config.json (SizeDict, tuples, int resample) pass
    the gate, and the loaded processor's output is still HF's."""
    HFProcessor(size=dict(CHECKPOINT_BUDGET)).save_pretrained(tmp_path)
    mp = MultimodalProcessor.from_pretrained(str(tmp_path), image_backend="pil")
    assert fast_image.settings_for(mp.image_processor, mp._call_kwargs(None)) is not None
    image = _image(333, 517)
    got = mp.image(image)
    want = mp.image_processor(images=[image], return_tensors="np")
    assert got["grid_thw"] == tuple(int(g) for g in want["image_grid_thw"][0])
    assert got["pixel_values"].tobytes() == np.asarray(want["pixel_values"]).tobytes()
