"""The MoE block: every grouped-matmul implementation against the dense oracle, the router
against transformers' definition, and the block with a shared expert against Qwen2-MoE's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmm.layers import moe


def _inputs(T, E, k, D=16, F=24, seed=0, skew=False):
    ks = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(ks[0], (T, D))
    gate = jax.random.normal(ks[1], (E, D, F)) * 0.3
    up = jax.random.normal(ks[2], (E, D, F)) * 0.3
    down = jax.random.normal(ks[3], (E, F, D)) * 0.3
    logits = jax.random.normal(ks[4], (T, E))
    if skew:  # every token routed to the same k experts: one group holds all of its rows
        logits = logits.at[:, :k].add(100.0)
    weights, ids = moe.route(logits, k, True)
    return x, weights, ids, gate, up, down


@pytest.mark.parametrize("impl", [i for i in moe.IMPLEMENTATIONS if i != "dense"])
@pytest.mark.parametrize("T,E,k,skew", [(1, 8, 2, False), (40, 8, 3, False), (33, 16, 4, True)])
def test_implementations_match_dense(impl, T, E, k, skew):
    x, w, ids, g, u, d = _inputs(T, E, k, skew=skew)
    ref = moe.experts_dense(x, w, ids, g, u, d, jax.nn.silu)
    out = jax.jit(moe.experts_forward, static_argnums=(6, 7))(x, w, ids, g, u, d, jax.nn.silu, impl)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # and the oracle itself against a per-token loop over the chosen experts
    xn, wn, idn, gn, un, dn = (np.asarray(a, np.float64) for a in (x, w, ids, g, u, d))
    loop = np.zeros_like(xn)
    for t in range(T):
        for j in range(k):
            e = int(idn[t, j])
            a = xn[t] @ gn[e]
            loop[t] += wn[t, j] * (((a / (1 + np.exp(-a))) * (xn[t] @ un[e])) @ dn[e])
    np.testing.assert_allclose(np.asarray(ref), loop, rtol=1e-5, atol=1e-5)


def test_capacity_buckets_never_drop_rows():
    """The static bucket count holds every routing: one expert taking every row, each row on
    its own expert, and a bucket size that leaves every group with a partial bucket."""
    cases = [(64, 4, 1, True, 16), (3, 16, 4, False, 1), (50, 8, 2, True, 5), (50, 8, 2, False, 16)]
    for T, E, k, skew, bucket in cases:
        x, w, ids, g, u, d = _inputs(T, E, k, skew=skew, seed=T)
        ref = moe.experts_dense(x, w, ids, g, u, d, jax.nn.silu)
        run = jax.jit(moe.experts_capacity, static_argnums=(6, 7))
        out = run(x, w, ids, g, u, d, jax.nn.silu, bucket)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_router_matches_transformers():
    torch = pytest.importorskip("torch")
    import transformers
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    for norm in (True, False):
        cfg = transformers.Qwen3MoeConfig(
            hidden_size=16, num_experts=8, num_experts_per_tok=3, norm_topk_prob=norm
        )
        router = Qwen3MoeTopKRouter(cfg)
        torch.manual_seed(0)
        with torch.no_grad():
            router.weight.normal_()
        x = torch.randn(10, 16)
        _, scores, idx = router(x)
        logits = np.asarray(x) @ router.weight.detach().numpy().T
        w, ids = moe.route(jnp.asarray(logits), 3, norm)
        np.testing.assert_array_equal(np.asarray(ids), idx.numpy())
        np.testing.assert_allclose(np.asarray(w), scores.detach().numpy(), rtol=1e-5)


def test_default_impl_is_static_per_bucket():
    assert moe.default_impl(16, 8, 128, "gpu") == "ragged"
    assert moe.default_impl(256, 8, 128, "gpu") == "ragged"
    assert moe.default_impl(512, 8, 128, "gpu") == "capacity"  # measured 2.8x ragged
    assert moe.default_impl(512, 8, 128, "tpu") == "ragged"
    assert moe.default_impl(4, 8, 128, "cpu") == "gather"
    assert moe.default_impl(512, 8, 128, "cpu") == "capacity"
    with pytest.raises(ValueError):
        moe.SparseMoeBlock(8, 8, 4, 2, "silu", norm_topk_prob=True, impl="nope", rngs=None)


@pytest.mark.parametrize("impl", moe.IMPLEMENTATIONS)
def test_padding_tokens_route_nowhere(impl):
    """Tokens past `valid` (a bucket's padding) change nothing for the real ones, even when
    they hold NaN, and the grouped forms give them no group (no expert is read for them)."""
    T, E, k, n = 12, 8, 2, 5
    x, w, ids, g, u, d = _inputs(T, E, k, seed=3)
    valid = jnp.arange(T) < n
    x = jnp.where(valid[:, None], x, jnp.nan)
    run = jax.jit(moe.experts_forward, static_argnums=(6, 7))
    out = run(x, w, ids, g, u, d, jax.nn.silu, impl, valid)
    ref = moe.experts_dense(x[:n], w[:n], ids[:n], g, u, d, jax.nn.silu)
    np.testing.assert_allclose(np.asarray(out[:n]), np.asarray(ref), rtol=1e-5, atol=1e-5)
    sizes = moe._sort_rows(jnp.where(valid[:, None], ids, E), E)[3]
    assert int(sizes.sum()) == n * k


SHARDED = r"""
import json, re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding
from jaxmm.layers import moe
from jaxmm.layers.linear import partition_spec
assert len(jax.devices()) == 4
mesh = Mesh(np.array(jax.devices()).reshape(1, 4), ("data", "model"))
out = {}
for E in (8, 6):  # 8: experts split over the devices; 6: each expert's F columns are
    ks = jax.random.split(jax.random.key(E), 5)
    T, k, D, F = 24, 2, 16, 8
    x = jax.random.normal(ks[0], (T, D))
    w = {"gate_proj": jax.random.normal(ks[1], (E, D, F)),
         "up_proj": jax.random.normal(ks[2], (E, D, F)),
         "down_proj": jax.random.normal(ks[3], (E, F, D))}
    weights, ids = moe.route(jax.random.normal(ks[4], (T, E)), k, True)
    valid = jnp.arange(T) < 19
    placed = {}
    for name, a in w.items():
        spec = partition_spec(("mlp", "experts", name), 3, a.shape, {"model": 4})
        placed[name] = jax.device_put(a, NamedSharding(mesh, spec))
    for impl in moe.IMPLEMENTATIONS:
        f = jax.jit(moe.experts_forward, static_argnums=(6, 7))
        one = f(x, weights, ids, w["gate_proj"], w["up_proj"], w["down_proj"], jax.nn.silu,
                impl, valid)
        four = f(x, weights, ids, placed["gate_proj"], placed["up_proj"],
                 placed["down_proj"], jax.nn.silu, impl, valid)
        spec = repr(tuple(placed["gate_proj"].sharding.spec))
        hlo = f.lower(x, weights, ids, placed["gate_proj"], placed["up_proj"],
                      placed["down_proj"], jax.nn.silu, impl, valid).compile().as_text()
        # float arrays gathered across devices (expert weights would be): none expected
        gathered = re.findall(r"= (f32\[[^]]*\])\S* all-gather", hlo)
        out[f"{E}-{impl}"] = [float(jnp.abs(one - four).max()), spec, gathered]
print(json.dumps(out))
"""


def test_sharded_experts_match_one_device():
    """Every implementation on 4 faked CPU devices, experts placed as the loader places them
    (E over the devices when it divides, else F), equals the one-device result."""
    import json
    import os
    import subprocess
    import sys

    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, cwd=root
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out) == 2 * len(moe.IMPLEMENTATIONS)
    for key, (err, spec, gathered) in out.items():
        assert err < 1e-4, key
        # expert parallelism keeps each device's experts local: GSPMD sums the outputs
        # (an all-reduce of (T, D)) instead of gathering weights
        assert not (key.startswith("8-") and gathered), (key, gathered)
        assert spec == (
            "('model', None, None)" if key.startswith("8-") else "(None, None, 'model')"
        ), key


def test_mosaic_gpu_only_where_it_runs():
    """JAX's Mosaic GPU grouped GEMM is chosen by name only where it compiles (a Hopper GPU,
    16-bit weights, widths in whole 128-column tiles); elsewhere a clear error."""
    x = jnp.ones((4, 128), jnp.bfloat16)
    w = jnp.ones((2, 128, 128), jnp.bfloat16)
    ids = jnp.zeros((4, 1), jnp.int32)
    weights = jnp.ones((4, 1), jnp.float32)
    assert not moe.mosaic_gpu_supported(128, 128, jnp.bfloat16, backend="cpu")
    assert not moe.mosaic_gpu_supported(128, 96, jnp.bfloat16, backend="gpu")
    assert not moe.mosaic_gpu_supported(128, 128, jnp.float32, backend="gpu")
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="Hopper"):
            moe.experts_forward(x, weights, ids, w, w, w, jax.nn.silu, impl="mosaic_gpu")
