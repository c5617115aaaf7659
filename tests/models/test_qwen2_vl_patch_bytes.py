"""Qwen2-VL / Qwen2.5-VL images as uint8 patches (`fast_image.PatchBytes`), expanded on device.

The front end hands the tower bytes + the byte table where `fast_image.py` applies; the tower
must give the features it gives for HF's float32 pixel values (the same values reach it), in
calls that mix both kinds too, without a compiled program per image size or per table, and
shape mistakes must still be reported before the encoder runs. End-to-end parity with HF
generate is `test_vlm_parity.py` (which takes this path).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from jaxmm.multimodal.fast_image import PatchBytes
from tests.models.test_vlm_parity import I_QWEN, make_qwen


def _image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), np.uint8))


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def qwen(request, ckpt_root):
    from jaxmm import LLM

    path = make_qwen(ckpt_root, request.param, seed=1)
    llm = LLM(path, dtype="float32", max_model_len=256, max_num_batched_tokens=64)
    return llm, llm.llm_engine.mm_frontend()


def _params():
    from jaxmm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def test_processor_keeps_bytes_for_this_tower(qwen):
    _, fe = qwen
    assert fe.model.mm_patch_bytes and fe.processor.patch_bytes
    out = fe.processor.image(_image(40, 28, 0))
    pb = out["pixel_values"]
    n = int(np.prod(out["grid_thw"]))
    assert isinstance(pb, PatchBytes) and pb.data.dtype == np.uint8
    assert pb.data.shape == (n, 3, 4 * 4) and pb.shape == (n, 3 * 2 * 4 * 4)  # tp 2, 4x4 patches
    hf = fe.processor.image_processor(images=[_image(40, 28, 0)], return_tensors="np")
    assert np.asarray(pb).tobytes() == np.asarray(hf["pixel_values"]).tobytes()
    assert fe.model.mm_num_tokens("image", out) == n // 4


def test_bytes_and_floats_give_the_same_features_in_mixed_calls(qwen):
    llm, fe = qwen
    runner = llm.llm_engine.runner
    encode = fe.model.mm_encoder(runner.graphdef)
    images = [_image(40, 28, 1), _image(48, 48, 2), _image(24, 36, 3), _image(33, 47, 4)]
    byte_items = [fe.processor.image(img) for img in images]
    float_items = [{**it, "pixel_values": np.asarray(it["pixel_values"])} for it in byte_items]
    want = encode(runner.params, "image", float_items)  # one call
    got = encode(runner.params, "image", byte_items)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == np.float32
        np.testing.assert_array_equal(g, w)  # the tower saw the same float32 values
    # bytes, floats, bytes, floats: four calls of one kind each, as if encoded one by one
    # (a call's bucket and layout change the float rounding, not the kind of its pixels)
    mixed = [byte_items[0], float_items[1], byte_items[2], float_items[3]]
    alone = [encode(runner.params, "image", [it])[0] for it in float_items]
    for m, w in zip(encode(runner.params, "image", mixed), alone, strict=True):
        np.testing.assert_array_equal(m, w)


def test_no_program_per_image_size_or_table(qwen):
    from jaxmm.runner.model_runner import backend_compile_count

    llm, fe = qwen
    runner = llm.llm_engine.runner
    encode = fe.model.mm_encoder(runner.graphdef)
    # 12x10, 10x12 and 10x10 patches: one 128-patch bucket (and 16 windows for Qwen2.5-VL)
    first = fe.processor.image(_image(40, 48, 5))
    encode(runner.params, "image", [first])
    compiled = backend_compile_count()
    other = fe.processor.image(_image(48, 40, 6), {"image_mean": [0.1, 0.2, 0.3]})
    assert not np.array_equal(other["pixel_values"].table, first["pixel_values"].table)
    encode(runner.params, "image", [other])
    encode(runner.params, "image", [fe.processor.image(_image(40, 40, 7))])
    assert backend_compile_count() == compiled


def test_generate_matches_float_pixels_and_keys_differ_by_settings(qwen):
    llm, fe = qwen
    prompt = {"prompt": f"Look: {I_QWEN} and {I_QWEN}!", "multi_modal_data": {}}
    images = [_image(40, 28, 8), _image(36, 44, 9)]
    with_bytes = llm.generate(
        [{**prompt, "multi_modal_data": {"image": images}}], _params(), use_tqdm=False
    )[0]
    fe.processor.patch_bytes = False
    fe.cache.clear()
    llm.llm_engine.reset_mm_cache()  # same key: make the float pixels go through the tower
    try:
        with_floats = llm.generate(
            [{**prompt, "multi_modal_data": {"image": images}}], _params(), use_tqdm=False
        )[0]
    finally:
        fe.processor.patch_bytes = True
    assert with_bytes.outputs[0].token_ids == with_floats.outputs[0].token_ids
    # other processor settings: other pixels, so another encoder-cache / prefix-cache key
    _, _, a = fe.prepare({**prompt, "multi_modal_data": {"image": images}})
    _, _, b = fe.prepare(
        {
            **prompt,
            "multi_modal_data": {"image": images},
            "mm_processor_kwargs": {"image_mean": [0.1, 0.2, 0.3]},
        }
    )
    assert [it.key for it in a.items] != [it.key for it in b.items]
    pixels = [np.asarray(m.items[0].data["pixel_values"]) for m in (a, b)]
    assert not np.array_equal(*pixels)


def test_shape_mistakes_are_reported_before_the_encoder(qwen):
    llm, fe = qwen
    calls = []
    runner = llm.llm_engine.runner
    encode = runner.encode
    runner.encode = lambda *a: calls.append(a) or encode(*a)
    try:
        # the processor repeats each image over 3 frames; the tower takes 2
        with pytest.raises(ValueError, match="processor produced pixel values of shape"):
            llm.generate(
                [
                    {
                        "prompt": f"{I_QWEN} hi",
                        "multi_modal_data": {"image": _image(40, 28, 10)},
                        "mm_processor_kwargs": {"temporal_patch_size": 3},
                    }
                ],
                _params(),
                use_tqdm=False,
            )
    finally:
        runner.encode = encode
    assert calls == []
    # called directly, the encoder refuses them too
    item = fe.processor.image(_image(40, 28, 10), {"temporal_patch_size": 3})
    assert isinstance(item["pixel_values"], PatchBytes)
    assert item["pixel_values"].temporal_patch_size == 3
    runner = llm.llm_engine.runner
    with pytest.raises(ValueError, match="temporal_patch_size is 2"):
        fe.model.mm_encoder(runner.graphdef)(runner.params, "image", [item])
