"""Qwen3-VL parity with transformers on a tiny random checkpoint: greedy tokens and logits,
float32.

The checkpoint is saved the way transformers 5 does it (`model.save_pretrained` and
`Qwen3VLProcessor.save_pretrained`: one processor_config.json holding the image and video
processors) next to a tokenizer with Qwen's vision tokens. It exercises what Qwen3-VL adds
to Qwen2-VL: learned position embeddings resampled to non-square grids (a 4x4 table),
DeepStack levels after the first two of three decoder layers, interleaved M-RoPE, q/k
norms. The HF side gets its pixels from the HF image processor and expands placeholders
itself (Qwen3VLProcessor's video half needs torchvision, which the test environment lacks).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from tests.helpers import make_processor, make_tokenizer
from tests.models.test_video_parity import _video
from tests.models.test_vlm_parity import (
    I_QWEN,
    IMAGES,
    QWEN_TEMPLATE,
    V_QWEN,
    _chunk_rows,
    _encode_items,
    _hf_generate,
    _image,
    _randomize,
)

NEW_TOKENS = 10
ARCHS = ["qwen3_vl", "qwen3_vl_moe"]


def make_qwen3_vl(root: str, arch: str = "qwen3_vl", seed: int | None = None) -> str:
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    path = os.path.join(root, arch)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tok = make_tokenizer(path)
    specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = QWEN_TEMPLATE
    ids = dict(
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )
    text = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        # H/2 = 8 frequencies: h at 1, 4, 7 and w at 2, 5 (interleaved), t elsewhere
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
    )
    vision = dict(
        depth=3,
        hidden_size=32,
        intermediate_size=48,
        num_heads=4,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=64,
        num_position_embeddings=16,  # a 4x4 table, resampled to every grid
        deepstack_visual_indexes=[0, 2],
    )
    if arch == "qwen3_vl":
        # tied, as Qwen3-VL-2B and -4B are (the MoE checkpoint below is not)
        cfg = transformers.Qwen3VLConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=True, **ids
        )
        model = transformers.Qwen3VLForConditionalGeneration(cfg)
    else:  # 4 experts, top 2, layer 1 dense; expert width 24 (not D / 2: layouts differ)
        del text["head_dim"]  # derived: 64 / 4
        text.update(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            mlp_only_layers=[1],
            tie_word_embeddings=False,
        )
        cfg = transformers.Qwen3VLMoeConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=False, **ids
        )
        model = transformers.Qwen3VLMoeForConditionalGeneration(cfg)
    # seeds whose greedy continuations are not a repeated token
    _randomize(model.eval(), {"qwen3_vl": 2, "qwen3_vl_moe": 5}[arch] if seed is None else seed)
    model.save_pretrained(path)
    kw = dict(patch_size=4, merge_size=2, temporal_patch_size=2)
    image = Qwen2VLImageProcessorPil(
        **kw, min_pixels=8 * 8, max_pixels=48 * 48, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    video = Qwen3VLVideoProcessor(**kw, size={"shortest_edge": 8 * 8, "longest_edge": 48 * 48 * 8})
    processor = make_processor(
        transformers.Qwen3VLProcessor,
        image_processor=image,
        tokenizer=tok,
        video_processor=video,
        chat_template=QWEN_TEMPLATE,
    )
    processor.save_pretrained(path)
    return path


TEXT_ONLY = {"prompt": "Once upon a time there was"}
PROMPTS = [
    TEXT_ONLY,
    {"prompt": f"{I_QWEN}Describe the image.", "multi_modal_data": {"image": IMAGES[0]}},
    {  # two images of different non-square sizes
        "prompt": f"Hello {I_QWEN} and {I_QWEN} what",
        "multi_modal_data": {"image": [IMAGES[2], IMAGES[3]]},
    },
    {"prompt": f"The {I_QWEN} quick brown fox", "multi_modal_data": {"image": IMAGES[1]}},
]


def _hf_inputs(path: str, prompt: dict, tok) -> dict:
    """HF model inputs for one prompt, built without jaxmm."""
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    if "multi_modal_data" not in prompt:
        ids = torch.tensor([tok(prompt["prompt"]).input_ids])
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    ip = AutoImageProcessor.from_pretrained(path, backend="pil")
    images = prompt["multi_modal_data"]["image"]
    images = images if isinstance(images, list) else [images]
    out = ip(images=images, return_tensors="np")
    counts = [int(np.prod(g)) // 4 for g in out["image_grid_thw"]]
    pieces = prompt["prompt"].split("<|image_pad|>")
    assert len(pieces) == len(counts) + 1
    text = pieces[0] + "".join("<|image_pad|>" * n + rest for n, rest in zip(counts, pieces[1:]))
    ids = torch.tensor([tok(text).input_ids])
    types = (ids == tok.convert_tokens_to_ids("<|image_pad|>")).long()
    return dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=types,
        pixel_values=torch.tensor(out["pixel_values"]),
        image_grid_thw=torch.tensor(out["image_grid_thw"]),
    )


# (name, jaxmm's video item, the clip's frames and rate as a transformers user gives them)
VIDEOS = [
    # 7 frames at 3 fps: 4 sampled (0, 2, 4, 6) -> 2 temporal patches at 0.3 s and 1.7 s
    ("fps", (_video(7, 30, 46, 2), {"fps": 3.0}), _video(7, 30, 46, 2), 3.0),
    # no rate: 24 fps assumed; 5 frames -> (0, 1, 3, 4), resized to 40x24
    ("no rate", _video(5, 40, 27, 4), _video(5, 40, 27, 4), None),
]


def _hf_video_inputs(path: str, prompt: str, frames: np.ndarray, fps, tok) -> dict:
    """transformers' video path without torchvision: its own frame sampling, resize budget
    and timestamp text (Qwen3VLVideoProcessor.sample_frames, smart_resize,
    Qwen3VLProcessor.replace_video_token), the pixels in torch (the interpolate call
    `tvF.resize` makes for uint8 frames, the fused normalisation, its patch order)."""
    import json

    import transformers
    from transformers.models.auto.image_processing_auto import AutoImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
        Qwen3VLVideoProcessor,
        smart_resize,
    )
    from transformers.video_utils import VideoMetadata

    with open(os.path.join(path, "processor_config.json")) as f:
        vc = json.load(f)["video_processor"]
    vp = Qwen3VLVideoProcessor(**{k: v for k, v in vc.items() if k != "video_processor_type"})
    proc = make_processor(
        transformers.Qwen3VLProcessor,
        image_processor=AutoImageProcessor.from_pretrained(path, backend="pil"),
        tokenizer=tok,
        video_processor=vp,
    )
    meta = VideoMetadata(total_num_frames=len(frames), fps=fps)
    indices = vp.sample_frames(meta)
    meta.frames_indices = indices
    p, m, tp = vp.patch_size, vp.merge_size, vp.temporal_patch_size
    x = torch.from_numpy(np.ascontiguousarray(frames[indices])).permute(0, 3, 1, 2)
    T, C, H, W = x.shape
    h, w = smart_resize(T, H, W, tp, p * m, vp.size["shortest_edge"], vp.size["longest_edge"])
    if (h, w) != (H, W):
        x = torch.nn.functional.interpolate(
            x, size=(h, w), mode="bicubic", antialias=True, align_corners=False
        )
    mean = torch.tensor(vp.image_mean).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(vp.image_std).view(1, 3, 1, 1) * 255.0
    x = (x.to(torch.float32) - mean) / std
    if T % tp:
        x = torch.cat([x, x[-1:].expand(tp - T % tp, -1, -1, -1)])
    t, gh, gw = len(x) // tp, h // p, w // p
    x = x.view(t, tp, C, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    grid = torch.tensor([[t, gh, gw]])
    span = proc.replace_video_token({"video_grid_thw": grid, "video_metadata": [meta]}, 0)
    ids = torch.tensor([tok(prompt.replace("<|video_pad|>", span)).input_ids])
    return dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=(ids == tok.convert_tokens_to_ids("<|video_pad|>")).long() * 2,
        pixel_values_videos=x.reshape(t * gh * gw, C * tp * p * p),
        video_grid_thw=grid,
    )


def _hf_model(path: str, arch: str):
    import transformers

    cls = {
        "qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
        "qwen3_vl_moe": transformers.Qwen3VLMoeForConditionalGeneration,
    }[arch]
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def _params():
    from jaxmm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module", params=ARCHS)
def vlm(request, ckpt_root):
    """(arch, path, LLM, HF model); 32 tokens per step: every image prompt is prefilled in
    chunks that cut through its image tokens."""
    from jaxmm import LLM

    path = make_qwen3_vl(ckpt_root, request.param)
    llm = LLM(
        path,
        dtype="float32",
        max_model_len=256,
        max_num_batched_tokens=32,
        enable_mm_embeds=True,
        limit_mm_per_prompt={"image": 2, "video": 1},
    )
    return request.param, path, llm, _hf_model(path, request.param)


def test_greedy_and_logits_match_transformers(vlm):
    arch, path, llm, hf = vlm
    tok = llm.get_tokenizer()
    outs = llm.generate(PROMPTS, _params(), use_tqdm=False)
    hf_inputs = [_hf_inputs(path, p, tok) for p in PROMPTS]
    for out, inputs in zip(outs, hf_inputs):
        assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
        assert len(out.prompt_token_ids) > 32 or "multi_modal_data" not in inputs
        assert out.outputs[0].token_ids == _hf_generate(hf, inputs)
    assert any(len(set(o.outputs[0].token_ids)) > 2 for o in outs)  # not a degenerate model

    ours = np.stack([_chunked_last_logits(llm, p) for p in PROMPTS])
    with torch.no_grad():
        ref = np.stack([hf(**inputs).logits[0, -1].numpy() for inputs in hf_inputs])
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def _chunked_last_logits(llm, prompt: dict) -> np.ndarray:
    """The prompt's last-token logits, prefilled in chunks of 24 tokens so that item spans
    straddle steps (scratch pages at the top of the pool; the engine is idle)."""
    from jaxmm.multimodal.inputs import prepare_multimodal_prompt
    from jaxmm.runner.model_runner import SeqStep

    engine = llm.llm_engine
    runner = engine.runner
    if "multi_modal_data" in prompt:
        _, ids, mm = prepare_multimodal_prompt(engine, prompt)
    else:
        ids, mm = llm.get_tokenizer()(prompt["prompt"]).input_ids, None
    n = math.ceil(len(ids) / runner.block_size)
    pages = list(range(runner.num_pages - n, runner.num_pages))
    rows_of = _encode_items(engine, mm)
    for start in range(0, len(ids), 24):
        chunk = ids[start : start + 24]
        step = SeqStep(chunk, start, pages, sample=start + len(chunk) == len(ids))
        if mm is not None:
            mm.fill_step(step, None, start, len(chunk))
            step.mm_rows = _chunk_rows(mm, rows_of, start, len(chunk))
        last = runner.logits([step])[0]
    return last


@pytest.mark.parametrize("vlm", ["qwen3_vl"], indirect=True)
@pytest.mark.parametrize("case", VIDEOS, ids=[v[0] for v in VIDEOS])
def test_video_with_frame_times_matches_transformers(vlm, case):
    """Frames sampled at 2 per second, the time text before each frame, per-frame M-RoPE;
    prefilled in chunks that cut through the span."""
    arch, path, llm, hf = vlm
    _, item, frames, fps = case
    prompt = {"prompt": f"Video: {V_QWEN} what happens", "multi_modal_data": {"video": item}}
    inputs = _hf_video_inputs(path, prompt["prompt"], frames, fps, llm.get_tokenizer())
    out = llm.generate([prompt], _params(), use_tqdm=False)[0]
    text = llm.get_tokenizer().decode(out.prompt_token_ids)
    assert text.count(" seconds>") == 2  # two temporal patches, each with its time
    assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
    assert out.outputs[0].token_ids == _hf_generate(hf, inputs)
    with torch.no_grad():
        ref = hf(**inputs).logits[0, -1].numpy()
    np.testing.assert_allclose(_chunked_last_logits(llm, prompt), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("vlm", ["qwen3_vl"], indirect=True)
def test_repeats_hit_the_prefix_and_encoder_caches(vlm):
    """The same prompt again is served from cached pages; the same image elsewhere in another
    prompt from the encoder cache (its pages differ): both still match transformers."""
    arch, path, llm, hf = vlm
    tok = llm.get_tokenizer()
    engine = llm.llm_engine
    calls = []
    encode = engine.runner.encode
    engine.runner.encode = lambda jobs: (calls.append(len(jobs)), encode(jobs))[1]
    try:
        image = _image(36, 20, 7)  # not seen by the other tests
        first = {"prompt": f"{I_QWEN}What is it?", "multi_modal_data": {"image": image}}
        moved = {"prompt": f"Look: {I_QWEN} now.", "multi_modal_data": {"image": image}}
        a = llm.generate([first], _params(), use_tqdm=False)[0]
        runs = len(calls)
        b = llm.generate([first], _params(), use_tqdm=False)[0]
        assert b.num_cached_tokens > 0
        hits = engine.encoder_cache.hits
        c = llm.generate([moved], _params(), use_tqdm=False)[0]
        assert len(calls) == runs >= 1  # no encoder run after the first request
        assert engine.encoder_cache.hits > hits
    finally:
        engine.runner.encode = encode
    assert b.outputs[0].token_ids == a.outputs[0].token_ids
    assert a.outputs[0].token_ids == _hf_generate(hf, _hf_inputs(path, first, tok))
    assert c.outputs[0].token_ids == _hf_generate(hf, _hf_inputs(path, moved, tok))


@pytest.mark.parametrize("vlm", ["qwen3_vl"], indirect=True)
def test_precomputed_embeddings_carry_deepstack_levels(vlm):
    """vLLM's form: the merger's output and every DeepStack level's, concatenated along D."""
    arch, path, llm, hf = vlm
    prompt = PROMPTS[1]
    inputs = _hf_inputs(path, prompt, llm.get_tokenizer())
    with torch.no_grad():
        out = hf.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        levels = [out.pooler_output[0]] + [d[0] for d in out.deepstack_features]
    embeds = torch.cat(levels, dim=-1).numpy()
    assert embeds.shape[1] == 64 * 3
    grid = inputs["image_grid_thw"][0]
    pixels, given = llm.generate(
        [
            prompt,
            {
                "prompt": prompt["prompt"],
                "multi_modal_data": {"image": {"image_embeds": embeds, "image_grid_thw": grid}},
            },
        ],
        _params(),
        use_tqdm=False,
    )
    assert given.outputs[0].token_ids == pixels.outputs[0].token_ids
    narrow = {"image_embeds": embeds[:, :64], "image_grid_thw": grid}
    with pytest.raises(ValueError, match="DeepStack"):
        llm.generate(
            [{"prompt": prompt["prompt"], "multi_modal_data": {"image": narrow}}],
            _params(),
            use_tqdm=False,
        )


def test_interleaved_mrope_rows():
    from jaxmm.models.qwen3_vl import interleaved_mrope_rows

    # Qwen3-VL-2B: head_dim 128, mrope_section [24, 20, 20]
    rows = interleaved_mrope_rows(64, [24, 20, 20])
    assert rows[:6] == (0, 1, 2, 0, 1, 2)
    assert rows[57:] == (0, 1, 2, 0, 0, 0, 0)  # h and w stop after 20 each
    assert rows.count(1) == 20 and rows.count(2) == 20 and rows.count(0) == 24


def test_moe_expert_tensors_in_either_layout(ckpt_root):
    """The released checkpoints' fused experts, (E, D, 2F) / (E, F, D), and transformers 5's
    own, (E, 2F, D) / (E, D, F) (what the parity checkpoint holds), give the same stacks."""
    import jax.numpy as jnp
    from flax import nnx
    from transformers import AutoConfig

    from jaxmm.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration

    cfg = AutoConfig.from_pretrained(make_qwen3_vl(ckpt_root, "qwen3_vl_moe"))
    model = nnx.eval_shape(
        lambda: Qwen3VLMoeForConditionalGeneration(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    )
    E, D, F = 4, 64, 24
    rs = np.random.RandomState(0)
    gate, up, down = rs.randn(E, D, F), rs.randn(E, D, F), rs.randn(E, F, D)
    stem = "model.language_model.layers.0.mlp.experts."
    released = [
        (stem + "gate_up_proj", np.concatenate([gate, up], axis=-1)),
        (stem + "down_proj", down),
    ]
    in_memory = [(k, np.swapaxes(a, 1, 2)) for k, a in released]
    for layout in (released, in_memory):
        got = dict(p for k, a in layout for p in model.convert_hf_tensor(k, a))
        assert sorted(got) == [stem + n for n in ("down_proj", "gate_proj", "up_proj")]
        np.testing.assert_array_equal(got[stem + "gate_proj"], gate)
        np.testing.assert_array_equal(got[stem + "up_proj"], up)
        np.testing.assert_array_equal(got[stem + "down_proj"], down)
    other = rs.randn(3, 5)
    assert model.convert_hf_tensor("model.visual.pos_embed.weight", other)[0][1] is other
