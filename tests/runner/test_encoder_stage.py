"""The encoder stage: encoders run in the engine's step, outputs live in the encoder cache.

The front end hands the engine host items only; the scheduler schedules an item's encoder
in the step whose chunk first needs it, the runner writes the outputs into its encoder cache
and the step splices them by row index. An image of another size in the same encoder bucket
compiles nothing; a repeated image runs no encoder; user embeddings and encoder outputs mix
in one step; a prompt whose images span chunk boundaries gives the tokens of one chunk.
"""

from __future__ import annotations

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
        enable_prefix_caching=False,  # every request prefills: encoder reuse shows alone
    )


def _image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), np.uint8))


def _generate(llm, prompts: list[dict], max_tokens: int = 6) -> list[list[int]]:
    from jaxmm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_front_end_hands_the_engine_host_items_only(llm):
    import pickle

    fe = llm.llm_engine.mm_frontend()
    _, ids, mm = fe.prepare(
        {"prompt": f"a {I_QWEN} b", "multi_modal_data": {"image": _image(40, 48, 0)}}
    )
    (item,) = mm.items
    assert isinstance(item.data["grid_thw"], tuple | list | np.ndarray)
    assert ids[item.start : item.end] == [ids[item.start]] * (item.end - item.start)
    # plain data: it crosses a process boundary as it is
    again = pickle.loads(pickle.dumps(mm))
    assert again.items[0].cache_key == item.cache_key
    assert not any("jax" in type(v).__module__ for v in vars(item).values())


def test_another_image_size_in_the_bucket_compiles_nothing(llm):
    from jaxmm.runner.model_runner import backend_compile_count

    engine = llm.llm_engine
    prompt = f"Look: {I_QWEN} what"
    # 12x10, 10x12 and 10x10 patches (30, 30 and 25 rows): one 128-patch encoder bucket,
    # prompts of one 64-token step bucket
    _generate(llm, [{"prompt": prompt, "multi_modal_data": {"image": _image(40, 48, 0)}}])
    compiled = backend_compile_count()
    before = engine.stats["encoder_items"]
    for img in (_image(48, 40, 1), _image(40, 40, 2)):
        _generate(llm, [{"prompt": prompt, "multi_modal_data": {"image": img}}])
    assert engine.stats["encoder_items"] - before == 2  # each image took the encoder
    assert backend_compile_count() == compiled  # no XLA compilation at all


def test_a_repeated_image_runs_no_encoder(llm):
    engine = llm.llm_engine
    img = _image(32, 40, 7)
    prompt = {"prompt": f"Again {I_QWEN} now", "multi_modal_data": {"image": img}}
    first = _generate(llm, [prompt])
    before = engine.stats["encoder_items"]
    second = _generate(llm, [prompt])
    assert second == first
    assert engine.stats["encoder_items"] == before  # served from the encoder cache
    engine.reset_mm_cache()
    assert _generate(llm, [prompt]) == first
    assert engine.stats["encoder_items"] == before + 1  # encoded again after the reset


def test_user_embeddings_and_encoder_outputs_mix_in_one_step(llm):
    engine, runner = llm.llm_engine, llm.llm_engine.runner
    fe = engine.mm_frontend()
    a, b = _image(16, 24, 3), _image(24, 16, 4)  # 6 rows each

    def as_user_embeds(img) -> dict:
        """An image's features as a user sends them: host numpy + the grid."""
        _, _, mm = fe.prepare({"prompt": I_QWEN, "multi_modal_data": {"image": img}})
        item = mm.items[0]
        rows = np.arange(item.end - item.start, dtype=np.int32)  # scratch rows
        runner.encode([("image", item.data, rows)])
        feats = np.asarray(runner.encoder_cache)[rows]
        engine.reset_mm_cache()
        return {"image_embeds": feats, "image_grid_thw": item.meta["grid_thw"]}

    user_a, user_b = as_user_embeds(a), as_user_embeds(b)
    text = f"The {I_QWEN} quick {I_QWEN} brown fox"
    mixed = {"prompt": text, "multi_modal_data": {"image": [a, user_b]}}
    all_host = {"prompt": text, "multi_modal_data": {"image": [user_a, user_b]}}
    tokens, host_tokens = _generate(llm, [mixed, all_host])
    assert tokens == host_tokens
    assert len(set(tokens)) > 1  # not a degenerate model


def test_small_encoder_budget_cuts_chunks_before_items(llm):
    """An encoder budget of one image per step: the second image's chunk waits a step, and
    the tokens do not change."""
    engine = llm.llm_engine
    imgs = [_image(16, 24, 11), _image(24, 16, 12), _image(24, 24, 13)]
    prompt = {
        "prompt": f"x {I_QWEN} y {I_QWEN} z {I_QWEN} w",
        "multi_modal_data": {"image": imgs},
    }
    want = _generate(llm, [prompt])
    engine.reset_mm_cache()
    budget = engine.scheduler.encoder_budget
    engine.scheduler.encoder_budget = 1  # the first item of a step always runs
    steps = []
    real = engine.runner.encode
    try:
        engine.runner.encode = lambda jobs: (steps.append(len(jobs)), real(jobs))[1]
        assert _generate(llm, [prompt]) == want
    finally:
        engine.runner.encode = real
        engine.scheduler.encoder_budget = budget
    assert steps == [1, 1, 1]


def test_warmup_covers_every_batch_of_warm_size_images(ckpt_root):
    """With warmup and the image sizes to expect, a batch of such images compiles nothing:
    not the vision tower for any count of them per step, not the writes into the encoder
    cache, not the step."""
    from jaxmm import LLM
    from jaxmm.runner.model_runner import backend_compile_count

    path = make_qwen(ckpt_root, "qwen2_vl", seed=1)
    llm = LLM(
        path,
        dtype="float32",
        max_model_len=256,
        max_num_batched_tokens=64,
        enable_prefix_caching=False,
        warmup=True,
        mm_warmup_image_sizes=["40x48"],
    )
    compiled = backend_compile_count()
    prompts = [
        {"prompt": f"Look {I_QWEN} here", "multi_modal_data": {"image": _image(40, 48, 20 + i)}}
        for i in range(5)
    ]
    tokens = _generate(llm, prompts, max_tokens=3)
    assert len(tokens) == 5 and llm.llm_engine.stats["encoder_items"] == 5
    assert backend_compile_count() == compiled
