"""Qwen3-MoE against transformers on tiny random checkpoints (float32): greedy tokens and
logits, both expert layouts a checkpoint can hold, and expert / tensor parallelism on a
faked 4-device host."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from jaxmm import LLM, SamplingParams
from jaxmm.runner.model_runner import SeqStep
from tests.helpers import hf_greedy, make_tokenizer

PROMPTS = [
    "Hello, my name is",
    "The capital of France is Paris. The capital of Italy",
    "JAX",
    "Once upon a time there was a small model that generated tokens one by one and",
]
NEW_TOKENS = 12


def make_moe_checkpoint(root: str, name: str, seed: int = 0, **overrides) -> str:
    """A tiny Qwen3-MoE (4 experts, top-2, layer 1 dense via mlp_only_layers) saved by
    transformers' own `save_pretrained`; returns the directory."""
    import transformers

    path = os.path.join(root, name)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tok = make_tokenizer(path)
    kw = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        mlp_only_layers=[1],
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    kw.update(overrides)
    cfg = transformers.Qwen3MoeConfig(**kw)
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():  # larger than default so greedy paths are not decided by ties
        for p in model.parameters():
            p.normal_(0, 0.08 if p.dim() > 1 else 0.5)
            if p.dim() == 1:
                p.abs_().add_(0.5)
    model.eval().save_pretrained(path)
    return path


def _generate(llm, ids):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _last_logits(llm, ids):
    runner = llm.llm_engine.runner
    steps, page = [], runner.num_pages - 1
    for i in ids:  # scratch pages from the top of the pool; the engine is idle
        n = math.ceil(len(i) / runner.block_size)
        table = list(range(page - n + 1, page + 1))
        steps.append(SeqStep(token_ids=i, start=0, block_table=table, sample=True))
        page -= n
    return runner.logits(steps)


@pytest.fixture(scope="module")
def moe_ckpt(ckpt_root):
    return make_moe_checkpoint(ckpt_root, "qwen3_moe")


def test_layout_of_saved_checkpoint(moe_ckpt):
    """What this transformers writes: per-expert tensors (what the loader must stack), a
    dense layer 1, and the config fields the model reads."""
    from safetensors import safe_open

    with safe_open(os.path.join(moe_ckpt, "model.safetensors"), "np") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in keys
    assert "model.layers.0.mlp.gate.weight" in keys
    assert "model.layers.1.mlp.gate_proj.weight" in keys
    assert not any(k.startswith("model.layers.1.mlp.experts") for k in keys)


def test_greedy_and_logits_match_transformers(moe_ckpt):
    from transformers import AutoModelForCausalLM

    llm = LLM(moe_ckpt, dtype="float32", max_model_len=256, max_num_batched_tokens=256)
    tok = llm.get_tokenizer()
    ids = [tok(p).input_ids for p in PROMPTS]
    assert _generate(llm, ids) == hf_greedy(moe_ckpt, ids, NEW_TOKENS)

    model = AutoModelForCausalLM.from_pretrained(moe_ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = np.stack([model(torch.tensor([i])).logits[0, -1].numpy() for i in ids])
    np.testing.assert_allclose(_last_logits(llm, ids), ref, atol=1e-4, rtol=0)


def test_fused_expert_layout_loads_the_same(moe_ckpt, tmp_path):
    """A checkpoint holding transformers' in-memory fused stacks (gate_up_proj (E, 2F, D),
    down_proj (E, D, F)) gives the same tokens as the per-expert one."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(os.path.join(moe_ckpt, "model.safetensors"), "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}

    def stack(prefix, proj):  # (E, out, in), as transformers keeps them in memory
        return np.stack([tensors[f"{prefix}.{e}.{proj}.weight"] for e in range(4)])

    fused = {}
    for key, value in tensors.items():
        if ".mlp.experts." not in key:
            fused[key] = value
            continue
        prefix = key.split(".mlp.experts.")[0] + ".mlp.experts"
        if prefix + ".down_proj" in fused:
            continue
        gate_up = [stack(prefix, "gate_proj"), stack(prefix, "up_proj")]
        fused[prefix + ".gate_up_proj"] = np.concatenate(gate_up, 1)
        fused[prefix + ".down_proj"] = stack(prefix, "down_proj")
    assert fused["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 48, 32)
    out = tmp_path / "fused"
    out.mkdir()
    save_file(fused, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(moe_ckpt):
        if not name.endswith(".safetensors"):
            os.symlink(os.path.join(moe_ckpt, name), out / name)

    ids = [[1, 20, 30, 40, 50]]
    a = LLM(moe_ckpt, dtype="float32", max_model_len=64, max_num_batched_tokens=64)
    b = LLM(str(out), dtype="float32", max_model_len=64, max_num_batched_tokens=64)
    assert _generate(a, ids) == _generate(b, ids)
    np.testing.assert_array_equal(_last_logits(a, ids), _last_logits(b, ids))


SCRIPT = r"""
import json, sys
import jax
from jaxmm import LLM, SamplingParams
assert len(jax.devices()) == 4, jax.devices()
outs = {}
for tp in (1, 4):
    llm = LLM(sys.argv[1], dtype="float32", max_model_len=64, tensor_parallel_size=tp)
    experts = llm.llm_engine.runner.params["model"]["layers"][0]["mlp"]["experts"]
    spec = tuple(experts["gate_proj"].get_value().sharding.spec)
    res = llm.generate(["Hello, my name is", "The quick brown fox jumps"],
                       SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)
    outs[tp] = dict(tokens=[o.outputs[0].token_ids for o in res], spec=repr(spec))
print(json.dumps(outs))
"""


@pytest.mark.parametrize("E,sharded", [(4, "('model', None, None)"), (6, "(None, None, 'model')")])
def test_expert_and_tensor_parallel_four_fake_devices(ckpt_root, E, sharded):
    """E=4 over 4 devices: each holds one expert (expert parallelism). E=6: experts do not
    split evenly, so each expert's F columns do (tensor parallelism inside the experts)."""
    path = make_moe_checkpoint(ckpt_root, f"qwen3_moe_e{E}", num_experts=E, num_key_value_heads=4)
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, path],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outs["1"]["tokens"] == outs["4"]["tokens"]
    assert outs["4"]["spec"] == sharded


def test_routing_compiles_nothing(moe_ckpt):
    """After warmup, batches whose tokens route to different experts (other prompts, other
    lengths, other batch sizes) run the warm programs: routing is data, not shape."""
    from jaxmm.runner.model_runner import backend_compile_count

    llm = LLM(moe_ckpt, dtype="float32", max_model_len=64, max_num_batched_tokens=32, warmup=True)
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], sp, use_tqdm=False)
    runner = llm.llm_engine.runner
    before = (runner.num_compiled(), backend_compile_count())
    rng = np.random.default_rng(0)
    for n, length in ((1, 5), (3, 11), (2, 29)):
        prompts = [{"prompt_token_ids": rng.integers(1, 200, length).tolist()} for _ in range(n)]
        llm.generate(prompts, sp, use_tqdm=False)
    assert (runner.num_compiled(), backend_compile_count()) == before
