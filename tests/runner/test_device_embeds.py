"""Encoder features stay on the device and are spliced into the step there.

Qwen2-VL's encoder leaves each item's rows on the device (`DeviceRows`), and the runner
gathers them into the step's (T, D) embeddings with one small program per (T, source
shape). An image of another size in the same encoder bucket must compile nothing (not the
splice, not a slice of the rows), and a step that mixes encoder rows with user embeddings
(host numpy) must give the embeddings and tokens of the all-host path.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from PIL import Image

from tests.models.test_vlm_parity import I_QWEN, make_qwen


@pytest.fixture(scope="module")
def llm(ckpt_root):
    from jaxmm import LLM

    path = make_qwen(ckpt_root, "qwen2_vl", seed=1)
    return LLM(
        path,
        dtype="float32",
        max_model_len=256,
        max_num_batched_tokens=64,
        enable_mm_embeds=True,
    )


def _image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), np.uint8))


def _generate(llm, prompts: list[dict]) -> list[list[int]]:
    from jaxmm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_another_image_size_in_the_bucket_compiles_nothing(llm):
    from jaxmm.multimodal.inputs import frontend
    from jaxmm.runner.model_runner import backend_compile_count

    runner = llm.llm_engine.runner
    fe = frontend(llm.llm_engine)
    prompt = f"Look: {I_QWEN} what"
    # 12x10, 10x12 and 10x10 patches (30, 30 and 25 rows): one 128-patch encoder bucket,
    # prompts of one 64-token step bucket; the encoder cache is cleared so each is encoded
    _generate(llm, [{"prompt": prompt, "multi_modal_data": {"image": _image(40, 48, 0)}}])
    splices = runner._splice._cache_size()
    assert splices > 0  # the rows took the device path
    compiled = backend_compile_count()
    for img in (_image(48, 40, 1), _image(40, 40, 2)):
        fe.cache.clear()
        _generate(llm, [{"prompt": prompt, "multi_modal_data": {"image": img}}])
    assert backend_compile_count() == compiled  # no XLA compilation at all
    assert runner._splice._cache_size() == splices
    # the cache counts the device rows it keeps alive: 32 merged rows of D=64 float32
    # (the bucket's padding rows included) for the last image
    assert len(fe.cache) == 1 and fe.cache.nbytes == 32 * 64 * 4


def test_mixed_device_and_host_rows_match_the_host_path(llm):
    from jaxmm.models.device_rows import DeviceRows
    from jaxmm.multimodal.inputs import frontend
    from jaxmm.runner.model_runner import SeqStep

    runner = llm.llm_engine.runner
    fe = frontend(llm.llm_engine)
    a, b = _image(16, 24, 3), _image(24, 16, 4)  # 6 rows each

    def as_user_embeds(img) -> dict:
        """An image's features as a user sends them: host numpy + the grid."""
        _, _, mm = fe.prepare({"prompt": I_QWEN, "multi_modal_data": {"image": img}})
        item = mm.items[0]
        return {"image_embeds": np.asarray(item.embeds), "image_grid_thw": item.meta["grid_thw"]}

    user_a, user_b = as_user_embeds(a), as_user_embeds(b)
    text = f"The {I_QWEN} quick {I_QWEN} brown fox"
    mixed = {"prompt": text, "multi_modal_data": {"image": [a, user_b]}}
    _, ids, mm = fe.prepare(mixed)
    assert isinstance(mm.items[0].embeds, DeviceRows)
    assert isinstance(mm.items[1].embeds, np.ndarray)

    # one prefill step holding both: built on the device, equal to the all-host buffer
    step = SeqStep(ids, 0, [], sample=True)
    mm.fill_step(step, None, 0, len(ids))
    host = SeqStep(ids, 0, [], sample=True, embeds=[(o, np.asarray(e)) for o, e in step.embeds])
    got, _ = runner.prepare([step])
    want, _ = runner.prepare([host])
    assert isinstance(got.embeds, jax.Array) and isinstance(want.embeds, np.ndarray)
    np.testing.assert_array_equal(np.asarray(got.embeds), want.embeds)
    np.testing.assert_array_equal(got.embeds_mask, want.embeds_mask)

    # and through the engine, batched with the same prompt given as user embeddings only
    all_host = {"prompt": text, "multi_modal_data": {"image": [user_a, user_b]}}
    tokens, host_tokens = _generate(llm, [mixed, all_host])
    assert tokens == host_tokens
    assert len(set(tokens)) > 1  # not a degenerate model
