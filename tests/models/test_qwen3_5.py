"""Qwen3.5 (hybrid Gated DeltaNet + full attention) against transformers' PyTorch path.

Float32, tiny random weights: exact greedy tokens and last-token logits within 1e-4, with
prompts longer than one WY chunk, chunked prefill at an odd budget, preemption in a tiny KV
pool, n=2, a repeated prompt with prefix caching on, and no compilation after warmup.
"""

import math
import os

import numpy as np
import pytest
import torch

from jaxmm import LLM, SamplingParams
from jaxmm.runner.model_runner import SeqStep, backend_compile_count
from tests.helpers import hf_greedy, make_tokenizer

PROMPTS = [
    "Hello, my name is",
    "The capital of France is Paris. The capital of Italy",
    "JAX",
    "Once upon a time there was a small model that generated tokens one by one and",
    "The quick brown fox",
]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def path(ckpt_root):
    import transformers

    path = os.path.join(ckpt_root, "qwen3_5")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tok = make_tokenizer(path)
    cfg = transformers.Qwen3_5TextConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=8,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3_5ForCausalLM(cfg)
    with torch.no_grad():  # larger than default, so greedy paths are not decided by ties
        for name, p in model.named_parameters():
            p.normal_(0, 0.08 if p.dim() > 1 else 0.3)
            if name.endswith("A_log"):
                p.uniform_(-1.0, 1.0)
    model.eval()
    model.save_pretrained(path)
    return path


def _ids(tok):
    ids = [tok(p).input_ids for p in PROMPTS]
    ids.append(ids[3] + ids[1] + ids[3])  # longer than one 64-token chunk of the WY form
    return ids


def _generate(llm, ids, n=1):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, n=n)
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_greedy_and_logits_match_transformers(path):
    from transformers import AutoModelForCausalLM

    llm = LLM(path, dtype="float32", max_model_len=256, max_num_batched_tokens=512)
    ids = _ids(llm.get_tokenizer())
    assert len(ids[-1]) > 64
    ref = hf_greedy(path, ids, NEW_TOKENS)
    assert [o[0] for o in _generate(llm, ids)] == ref

    runner = llm.llm_engine.runner
    G, page, steps = runner.block_size, runner.num_pages - 1, []
    for i in ids:  # scratch pages from the top of the pool; the engine is idle
        n = math.ceil(len(i) / G)
        table = list(range(page - n + 1, page + 1))
        steps.append(SeqStep(token_ids=i, start=0, block_table=table, sample=True))
        page -= n
    logits = runner.logits(steps)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = np.stack([model(torch.tensor([i])).logits[0, -1].numpy() for i in ids])
    np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)


def test_chunked_preempted_n2_and_prefix_cache_without_recompiles(path):
    # 13-token budget: prompts split in odd chunks carrying the state; 8 pages of 16 tokens
    # for five sequences growing to 55 tokens: preemption
    llm = LLM(
        path,
        dtype="float32",
        max_model_len=128,
        max_num_batched_tokens=13,
        num_gpu_blocks_override=8,
        enable_prefix_caching=True,
        warmup=True,
    )
    runner = llm.llm_engine.runner
    compiled = (runner.num_compiled(), backend_compile_count())
    ids = _ids(llm.get_tokenizer())[:-1]  # within max_model_len
    ref = hf_greedy(path, ids, NEW_TOKENS)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    assert [o[0] for o in _generate(llm, ids)] == ref
    assert llm.llm_engine.scheduler.num_preemptions > 0

    two = _generate(llm, ids[1:2], n=2)[0]  # each completion holds its own state slot
    assert two == [ref[1], ref[1]]

    # prefix caching: the prompt's state was kept at its last page boundary, so the same
    # prompt again starts there; a prompt extending it starts at that snapshot too
    G = runner.block_size
    tok = llm.get_tokenizer()
    longer = ids[3] + tok(" and then more").input_ids[1:]
    cut = (len(ids[3]) - 1) // G * G
    assert cut > 0
    llm.reset_prefix_cache()  # pages and snapshots
    outs = []
    for prompt in (ids[3], ids[3], longer):
        outs.append(llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0])
    assert [o.num_cached_tokens for o in outs] == [0, cut, cut]
    assert [o.outputs[0].token_ids for o in outs] == [ref[3], ref[3]] + hf_greedy(
        path, [longer], NEW_TOKENS
    )
    assert (runner.num_compiled(), backend_compile_count()) == compiled
    slots = llm.llm_engine.scheduler.state_slots
    assert slots.num_free == slots.num_slots  # every slot came back


# -- Qwen3_5ForConditionalGeneration: Qwen3-VL's front end and tower around the hybrid ------


def make_qwen3_5_vl(root: str) -> str:
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from tests.helpers import make_processor
    from tests.models.test_vlm_parity import QWEN_TEMPLATE, _randomize

    path = os.path.join(root, "qwen3_5_vl")
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
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=8,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        # rotary on 8 of 32 dims: 4 frequencies, h at 1 and w at 2 (interleaved), t elsewhere
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
    )
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=48,
        num_heads=4,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=64,
        num_position_embeddings=16,
    )
    cfg = transformers.Qwen3_5Config(text_config=text, vision_config=vision, **ids)
    model = transformers.Qwen3_5ForConditionalGeneration(cfg).eval()
    _randomize(model, 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.uniform_(-1.0, 1.0)
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


def _chunked_last_logits(llm, prompt: dict, chunk: int = 24) -> np.ndarray:
    """The prompt's last-token logits, prefilled in `chunk`-token steps with state slot 0 and
    scratch pages at the top of the pool (the engine is idle)."""
    from jaxmm.multimodal.inputs import prepare_multimodal_prompt
    from tests.models.test_vlm_parity import _chunk_rows, _encode_items

    engine = llm.llm_engine
    runner = engine.runner
    if "multi_modal_data" in prompt:
        _, ids, mm = prepare_multimodal_prompt(engine, prompt)
    else:
        ids, mm = llm.get_tokenizer()(prompt["prompt"]).input_ids, None
    n = math.ceil(len(ids) / runner.block_size)
    pages = list(range(runner.num_pages - n, runner.num_pages))
    rows_of = _encode_items(engine, mm)
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        step = SeqStep(part, start, pages, sample=start + len(part) == len(ids), state_slot=0)
        if mm is not None:
            mm.fill_step(step, None, start, len(part))
            step.mm_rows = _chunk_rows(mm, rows_of, start, len(part))
        last = runner.logits([step])[0]
    return last


def test_vl_images_match_transformers(ckpt_root):
    """Text-only and image prompts (one, two of different sizes) prefilled in 32-token steps
    that cut through the image tokens: greedy tokens and last-token logits."""
    import transformers

    from tests.models.test_qwen3_vl import PROMPTS as VL_PROMPTS
    from tests.models.test_qwen3_vl import _hf_inputs
    from tests.models.test_vlm_parity import _hf_generate

    path = make_qwen3_5_vl(ckpt_root)
    llm = LLM(
        path,
        dtype="float32",
        max_model_len=256,
        max_num_batched_tokens=32,
        limit_mm_per_prompt={"image": 2},
    )
    hf = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    hf.eval()
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    outs = llm.generate(VL_PROMPTS, params, use_tqdm=False)
    inputs = [_hf_inputs(path, p, tok) for p in VL_PROMPTS]
    for out, inp in zip(outs, inputs):
        assert out.prompt_token_ids == inp["input_ids"][0].tolist()
        assert out.outputs[0].token_ids == _hf_generate(hf, inp)[:10]
    assert any(len(set(o.outputs[0].token_ids)) > 2 for o in outs)  # not a degenerate model
    ours = np.stack([_chunked_last_logits(llm, p) for p in VL_PROMPTS])
    with torch.no_grad():
        ref = np.stack([hf(**inp).logits[0, -1].numpy() for inp in inputs])
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
