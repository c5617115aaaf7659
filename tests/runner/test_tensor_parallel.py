"""Tensor parallelism on a faked 4-device CPU host: the same greedy tokens at TP 1, 2 and 4,
KV heads fewer than the TP size replicated (Qwen2 with one KV head), and a clear error for
sizes that cannot split the heads."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import make_checkpoint, make_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))

SCRIPT = r"""
import json, sys
import jax
from jaxmm import LLM, SamplingParams
assert len(jax.devices()) == 4, jax.devices()
path, sizes = sys.argv[1], [int(t) for t in sys.argv[2].split(",")]
outs, kv = {}, {}
for tp in sizes:
    llm = LLM(path, dtype="float32", max_model_len=64, max_num_batched_tokens=64,
              tensor_parallel_size=tp, attention_backend=sys.argv[3])
    runner = llm.llm_engine.runner
    pages = runner.kv_caches[0]
    # (KV heads stored, devices holding the pages, KV heads per device)
    kv[tp] = [pages.shape[1], len(pages.sharding.device_set),
              pages.addressable_shards[0].data.shape[1]]
    res = llm.generate(["Hello, my name is", "The quick brown fox jumps"],
                       SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                       use_tqdm=False)
    outs[tp] = [o.outputs[0].token_ids for o in res]
print(json.dumps({"tokens": outs, "kv": kv}))
"""


def run_fake_devices(args: list[str], n: int = 4, timeout: int = 400):
    env = dict(
        os.environ,
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}",
        JAX_PLATFORMS="cpu",
    )
    return subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def make_one_kv_head_qwen2(root: str) -> str:
    """Qwen2 with 4 q heads sharing 1 KV head (the layout of many small GQA models)."""
    import torch
    import transformers

    path = os.path.join(root, "qwen2_kv1")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tok = make_tokenizer(path)
    cfg = transformers.Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(3)
    model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08 if p.dim() > 1 else 0.5)
    model.eval().save_pretrained(path)
    return path


@pytest.mark.parametrize("which", ["qwen2_kv1", "llama"])
def test_same_tokens_at_tp_1_2_4(ckpt_root, which):
    if which == "qwen2_kv1":
        path, K = make_one_kv_head_qwen2(ckpt_root), 1
    else:
        path, K = make_checkpoint(ckpt_root, "llama"), 2  # 4 q heads, 2 KV heads
    sizes = "1,2,4"
    proc = run_fake_devices(["-c", SCRIPT, path, sizes, "xla"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    tokens = got["tokens"]
    assert all(len(t) == 6 for t in tokens["1"])
    for tp in sizes.split(","):
        assert tokens[tp] == tokens["1"], (tp, tokens)
        # each device holds max(K / tp, 1) KV heads: replicated when tp > K
        t = int(tp)
        assert got["kv"][tp] == [max(K, t), t, max(K, t) // t]


def test_tp_size_that_cannot_split_heads_names_valid_sizes(ckpt_root):
    path = make_checkpoint(ckpt_root, "llama")  # 4 q heads, 2 KV heads
    script = (
        "import sys\nfrom jaxmm import LLM\n"
        "LLM(sys.argv[1], dtype='float32', max_model_len=64, tensor_parallel_size=3)\n"
    )
    proc = run_fake_devices(["-c", script, path])
    assert proc.returncode != 0
    assert "tensor_parallel_size=3 cannot split 4 attention heads and 2 KV heads evenly" in (
        proc.stderr
    )
    assert "valid sizes: 1, 2, 4" in proc.stderr


KERNEL_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxmm.layers.attention import AttentionMetadata, paged_attention
backend, K, tp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
T, N, H, G, A = 8, 4, 32, 8, 8
Kp = max(K, tp)  # KV heads stored (replicated when tp > K)
q = jnp.asarray(rng.standard_normal((T, N, H)), jnp.float32)
k, v = (jnp.asarray(rng.standard_normal((T, K, H)), jnp.float32) for _ in range(2))
base = rng.standard_normal((2, K, A, G, H)).astype(np.float32)
pages = jnp.asarray(np.repeat(base, Kp // K, axis=1))
md = AttentionMetadata(
    positions=jnp.zeros(T, jnp.int32), kv_lens=jnp.array([13, 3], jnp.int32),
    page_indices=jnp.array([[0, 1, 2], [3, 4, 5]], jnp.int32),
    cu_q_lens=jnp.array([0, 5, 8], jnp.int32), num_seqs=jnp.array([2], jnp.int32),
    logits_indices=jnp.zeros(2, jnp.int32))
want, want_pages = paged_attention(q, k, v, pages, md, sm_scale=H**-0.5, backend="reference")
mesh = Mesh(np.array(jax.devices()[:tp]).reshape(1, tp), ("data", "model"))
pages_sh = jax.device_put(pages, NamedSharding(mesh, P(None, "model")))
def step(q, k, v, pages, md):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return paged_attention(q, k, v, pages, md, sm_scale=H**-0.5, backend=backend)
got, got_pages = jax.jit(step)(q, k, v, pages_sh, md)
print(json.dumps({
    "out": float(jnp.max(jnp.abs(got - want))),
    "pages": float(jnp.max(jnp.abs(got_pages - want_pages))),
    "devices": len(got_pages.sharding.device_set),
}))
"""


@pytest.mark.parametrize("backend", ["pallas_tpu", "pallas", "xla"])
def test_attention_kernel_under_shard_map_matches_reference(backend):
    """The Pallas kernel is not auto-partitioned: under the mesh it runs per device on its
    own KV heads (one KV head replicated over 4 devices here) and matches the reference."""
    proc = run_fake_devices(["-c", KERNEL_SCRIPT, backend, "1", "4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["out"] < 1e-4 and got["pages"] == 0.0
    assert got["devices"] == 4


VLM_SCRIPT = r"""
import json, sys
from jaxmm import LLM, SamplingParams
from tests.models.test_vlm_parity import IMAGES, I_QWEN
prompts = [
    {"prompt": f"{I_QWEN}Describe the image.", "multi_modal_data": {"image": IMAGES[0]}},
    {"prompt": f"The {I_QWEN} quick brown fox", "multi_modal_data": {"image": IMAGES[3]}},
]
outs = {}
for tp in (1, 2):
    llm = LLM(sys.argv[1], dtype="float32", max_model_len=256, max_num_batched_tokens=64,
              tensor_parallel_size=tp)
    res = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                       use_tqdm=False)
    outs[tp] = [o.outputs[0].token_ids for o in res]
print(json.dumps(outs))
"""


def test_qwen2_vl_same_tokens_at_tp_2(ckpt_root):
    """Vision tower and M-RoPE language model sharded over 2 devices, image prompts."""
    from tests.models.test_vlm_parity import make_vlm

    path = make_vlm(ckpt_root, "qwen2_vl")
    proc = run_fake_devices(["-c", VLM_SCRIPT, path], n=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(len(t) == 6 for t in outs["1"])
    assert outs["2"] == outs["1"]
