"""Qwen3.5-MoE (the Qwen3.5 hybrid with a routed + shared-expert MoE block) against
transformers' PyTorch path.

Float32, tiny random weights (8 experts, top-2, a shared expert with its sigmoid gate):
exact greedy tokens and last-token logits within 1e-4; chunked prefill at an odd budget with
preemption, n=2 and prefix-cache hits; Qwen3_5MoeForConditionalGeneration with text-only and
image prompts, prefilled in odd-sized chunks through the image tokens.
"""

import math
import os
import shutil

import numpy as np
import pytest
import torch

from jaxmm import LLM, SamplingParams
from jaxmm.runner.model_runner import SeqStep, backend_compile_count
from tests.helpers import hf_greedy, make_tokenizer
from tests.models.test_qwen3_5 import NEW_TOKENS, _chunked_last_logits, _generate, _ids

MOE = dict(
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
)


def _randomize(model, seed: int) -> None:
    """Larger than default weights, so greedy paths and top-k choices are not ties."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.08 if p.dim() > 1 else 0.3)
            if name.endswith("A_log"):
                p.uniform_(-1.0, 1.0)


@pytest.fixture(scope="module")
def path(ckpt_root):
    import transformers

    path = os.path.join(ckpt_root, "qwen3_5_moe")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tok = make_tokenizer(path)
    cfg = transformers.Qwen3_5MoeTextConfig(
        vocab_size=len(tok),
        hidden_size=64,
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
        **MOE,
    )
    model = transformers.Qwen3_5MoeForCausalLM(cfg).eval()
    _randomize(model, 0)
    model.save_pretrained(path)
    return path


def test_saved_checkpoint_holds_per_expert_weights_and_a_gated_shared_expert(path):
    """What this transformers writes (and the loader must stack): per-expert projections,
    the router, the shared expert and its D -> 1 gate, in every layer."""
    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), "np") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    E, F, D = MOE["num_experts"], MOE["moe_intermediate_size"], 64
    for i in range(3):  # every layer is sparse
        stem = f"model.layers.{i}.mlp."
        assert shapes[stem + f"experts.{E - 1}.gate_proj.weight"] == (F, D)
        assert shapes[stem + f"experts.{E - 1}.down_proj.weight"] == (D, F)
        assert shapes[stem + "gate.weight"] == (E, D)
        assert shapes[stem + "shared_expert.gate_proj.weight"] == (48, D)
        assert shapes[stem + "shared_expert_gate.weight"] == (1, D)


def test_greedy_and_logits_match_transformers(path):
    llm = LLM(path, dtype="float32", max_model_len=256, max_num_batched_tokens=512)
    ids = _ids(llm.get_tokenizer())
    assert len(ids[-1]) > 64  # longer than one chunk of the WY form
    ref = hf_greedy(path, ids, NEW_TOKENS)
    assert [o[0] for o in _generate(llm, ids)] == ref
    assert any(len(set(r)) > 2 for r in ref)  # not a degenerate model

    np.testing.assert_allclose(
        _last_logits(llm, ids), _hf_last_logits(path, ids), atol=1e-4, rtol=0
    )


def _last_logits(llm, ids: list[list[int]]) -> np.ndarray:
    """Each prompt's last-token logits from one prefill step of them all."""
    runner = llm.llm_engine.runner
    G, page, steps = runner.block_size, runner.num_pages - 1, []
    for i in ids:  # scratch pages from the top of the pool; the engine is idle
        n = math.ceil(len(i) / G)
        table = list(range(page - n + 1, page + 1))
        steps.append(SeqStep(token_ids=i, start=0, block_table=table, sample=True))
        page -= n
    return runner.logits(steps)


def _hf_last_logits(path: str, ids: list[list[int]]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return np.stack([model(torch.tensor([i])).logits[0, -1].numpy() for i in ids])


def _fuse_experts(src: str, dst: str) -> None:
    """dst: src's checkpoint with each layer's experts as transformers keeps them in memory,
    gate_up_proj (E, 2F, D) (gate first) and down_proj (E, D, F), the other layout the
    loader takes."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(os.path.join(src, "model.safetensors"), "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out, E = {}, MOE["num_experts"]
    for key, value in tensors.items():
        if ".mlp.experts." not in key:
            out[key] = value
            continue
        stem = key.split(".mlp.experts.")[0] + ".mlp.experts"
        if stem + ".down_proj" in out:
            continue

        def stack(proj, stem=stem):
            return np.stack([tensors[f"{stem}.{e}.{proj}.weight"] for e in range(E)])

        out[stem + ".gate_up_proj"] = np.concatenate([stack("gate_proj"), stack("up_proj")], 1)
        out[stem + ".down_proj"] = stack("down_proj")
    os.makedirs(dst)
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(src):
        if not name.endswith(".safetensors"):
            os.symlink(os.path.join(src, name), os.path.join(dst, name))


def test_fused_expert_layout_matches_transformers(path, tmp_path):
    """The fused layout (released checkpoints may hold it) gives transformers' logits."""
    fused = str(tmp_path / "fused")
    _fuse_experts(path, fused)
    llm = LLM(fused, dtype="float32", max_model_len=64, max_num_batched_tokens=128)
    ids = _ids(llm.get_tokenizer())[:3]
    np.testing.assert_allclose(
        _last_logits(llm, ids), _hf_last_logits(path, ids), atol=1e-4, rtol=0
    )


def test_chunked_preempted_n2_and_prefix_cache_without_recompiles(path):
    # 13-token budget: prompts split in odd chunks carrying the state (and the MoE block sees
    # padded buckets); 8 pages of 16 tokens for five sequences growing to 55 tokens: preemption
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
    assert [o[0] for o in _generate(llm, ids)] == ref
    assert llm.llm_engine.scheduler.num_preemptions > 0

    assert _generate(llm, ids[1:2], n=2)[0] == [ref[1], ref[1]]  # a state slot each

    # prefix caching: the same prompt again starts at its last page boundary's snapshot
    G = runner.block_size
    cut = (len(ids[3]) - 1) // G * G
    assert cut > 0
    llm.reset_prefix_cache()
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = [
        llm.generate([{"prompt_token_ids": ids[3]}], params, use_tqdm=False)[0] for _ in range(2)
    ]
    assert [o.num_cached_tokens for o in outs] == [0, cut]
    assert [o.outputs[0].token_ids for o in outs] == [ref[3], ref[3]]
    assert (runner.num_compiled(), backend_compile_count()) == compiled
    slots = llm.llm_engine.scheduler.state_slots
    assert slots.num_free == slots.num_slots  # every slot came back


# -- Qwen3_5MoeForConditionalGeneration: Qwen3-VL's front end and tower around the hybrid ---


def make_qwen3_5_moe_vl(root: str) -> str:
    """The dense Qwen3.5-VL test checkpoint's tokenizer, processor, vision tower settings and
    text shapes, with MoE feed-forward layers instead of dense ones."""
    import transformers

    from tests.models.test_qwen3_5 import make_qwen3_5_vl

    path = os.path.join(root, "qwen3_5_moe_vl")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    dense_path = make_qwen3_5_vl(root)
    os.makedirs(path)
    for name in os.listdir(dense_path):  # tokenizer and processor files
        if name not in ("config.json", "generation_config.json") and ".safetensors" not in name:
            shutil.copy(os.path.join(dense_path, name), path)
    dense = transformers.AutoConfig.from_pretrained(dense_path)
    text = dense.text_config.to_dict()
    for key in ("model_type", "intermediate_size", "transformers_version", "architectures"):
        text.pop(key, None)
    ids = {k: getattr(dense, k) for k in ("image_token_id", "video_token_id")}
    ids.update({k: getattr(dense, k) for k in ("vision_start_token_id", "vision_end_token_id")})
    cfg = transformers.Qwen3_5MoeConfig(
        text_config={**text, **MOE},
        vision_config=dense.vision_config.to_dict(),
        **ids,
    )
    model = transformers.Qwen3_5MoeForConditionalGeneration(cfg).eval()
    _randomize(model, 1)
    model.save_pretrained(path)
    return path


def test_vl_images_match_transformers(ckpt_root):
    """Text-only and image prompts (one, two of different sizes), generated at an odd 29-token
    budget and prefilled in 13-token steps that cut through the image tokens: greedy tokens
    and last-token logits; a repeated image prompt hits the prefix cache."""
    import transformers

    from tests.models.test_qwen3_vl import PROMPTS as VL_PROMPTS
    from tests.models.test_qwen3_vl import _hf_inputs
    from tests.models.test_vlm_parity import _hf_generate

    path = make_qwen3_5_moe_vl(ckpt_root)
    llm = LLM(
        path,
        dtype="float32",
        max_model_len=256,
        max_num_batched_tokens=29,
        limit_mm_per_prompt={"image": 2},
        enable_prefix_caching=True,
    )
    assert type(llm.llm_engine.runner.model_obj).__name__ == "Qwen3_5MoeForConditionalGeneration"
    hf = transformers.Qwen3_5MoeForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32
    ).eval()
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    outs = llm.generate(VL_PROMPTS, params, use_tqdm=False)
    inputs = [_hf_inputs(path, p, tok) for p in VL_PROMPTS]
    for out, inp in zip(outs, inputs):
        assert out.prompt_token_ids == inp["input_ids"][0].tolist()
        assert out.outputs[0].token_ids == _hf_generate(hf, inp)[:10]
    assert any(len(set(o.outputs[0].token_ids)) > 2 for o in outs)  # not a degenerate model

    # prefix cache hit: the two-image prompt again starts at its last page boundary's state
    # snapshot, its image tokens' pages reused
    again = llm.generate([VL_PROMPTS[2]], params, use_tqdm=False)[0]
    G = llm.llm_engine.runner.block_size
    assert again.num_cached_tokens == (len(again.prompt_token_ids) - 1) // G * G > 0
    assert again.outputs[0].token_ids == outs[2].outputs[0].token_ids

    # last (scratch pages at the top of the pool would spoil cached ones)
    ours = np.stack([_chunked_last_logits(llm, p, chunk=13) for p in VL_PROMPTS])
    with torch.no_grad():
        ref = np.stack([hf(**inp).logits[0, -1].numpy() for inp in inputs])
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_decode_benchmark_smoke(tmp_path, capsys):
    """benchmarks/qwen3_5_moe_decode.py at its tiny shape on CPU (smoke, not timings)."""
    import json

    from benchmarks import qwen3_5_moe_decode as bench

    argv = ["--config", "tiny", "--parts", "jaxmm", "--in-process", "--workdir", str(tmp_path)]
    result = bench.main(argv)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    cfg = bench.hf_config("tiny")
    L, D, E, k = 4, cfg["hidden_size"], cfg["num_experts"], cfg["num_experts_per_tok"]
    routed = L * 3 * E * D * cfg["moe_intermediate_size"] * 4  # float32 expert stacks
    assert result["active_weight_bytes"] == result["total_weight_bytes"] - routed * (E - k) // E
    # 3 of 4 layers are linear: conv state (kernel - 1 columns) + float32 recurrent state
    conv, rec = 3 * (2 * 2 * 16 + 4 * 16) * 4, 4 * 16 * 16 * 4
    assert result["state_bytes_per_sequence"] == 3 * (conv + rec)
    # engine time per token is a difference of two timings: noise on a busy CPU
    assert result["roofline_ms_per_token"] > 0 and result["device_step_ms"] > 0
    assert isinstance(result["engine_ms_per_token"], float) and result["jax_version"]
