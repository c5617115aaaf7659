"""Mixture-of-experts block: a softmax top-k router over stacked experts.

The story of one call, for tokens x: (T, D):
1. The router `gate` (a Linear D -> E, HF's `mlp.gate.weight`) scores every expert; softmax
   in float32, top-k, and with `norm_topk_prob` the k weights renormalised to sum to one.
2. The experts, stacked as `gate_proj`/`up_proj`: (E, D, F) and `down_proj`: (E, F, D), run
   on the (token, expert) pairs the router chose and their outputs are summed with the
   router's weights. HF 5.x keeps `gate_up_proj` fused as (E, 2F, D); here gate and up stay
   apart so that tensor parallelism over F inside an expert pairs each device's gate and up
   columns without a reshuffle (weights/experts.py splits and transposes on load).
3. Optionally (Qwen2-MoE, Qwen3-Next, Qwen3-Omni) a shared expert, a plain gated MLP scaled
   by sigmoid(`shared_expert_gate`(x)), is added.

Grouped matmul: every implementation has the signature
`fn(x, weights, ids, gate, up, down, act) -> (T, D)`, and none has a shape that depends on
the routing, so a token bucket compiles once whatever the router picks:
- `dense`: every expert on every token, unchosen ones weighted zero. E/k times the work;
  the oracle the others are tested against.
- `ragged`: the T*k (token, expert) rows sorted by expert, then `jax.lax.ragged_dot` with the
  per-expert row counts as group sizes (XLA's grouped GEMM on GPU and TPU).
- `capacity`: the sorted rows laid out in buckets of B rows, each expert's rows padded to
  whole buckets; a dense batched einsum per bucket with that bucket's expert weights. The
  bucket count floor(T*k/B) + min(E, T*k) bounds sum_e ceil(n_e/B) for any routing, so no
  row is ever dropped (a static capacity, exact).
- `gather`: each token's k expert matrices gathered, one batched einsum. Touches only the
  chosen experts' weights, but XLA materialises the gathered copies: meant for few rows on
  CPU.
- `pallas`: the rows sorted as `ragged` sorts them, then our Pallas grouped GEMM
  (kernels/grouped_matmul.py: Triton-lowered on GPU, a Mosaic variant on TPU, interpret mode
  elsewhere, so only for tests on CPU). Selectable by name; `auto` never picks it until the
  H100 run of benchmarks/moe_layer.py shows it ahead. A pallas_call is not partitioned by
  GSPMD, so with expert weights sharded over a mesh it would gather them: one device only
  for now.
- `mosaic_gpu`: the rows sorted as `ragged` sorts them, then the Pallas Mosaic GPU grouped
  GEMM JAX ships (jax.experimental.pallas.ops.gpu.ragged_dot_mgpu: TMA, wgmma, Hopper only),
  where its tiles divide the shapes (`mosaic_gpu_supported`); like `pallas`, one device only.
`auto` picks per backend and token count (`default_impl`, with the H100 numbers behind it).

Sharding: the stacked expert weights shard over the mesh's "model" axis along E when E
divides it (expert parallelism), else along F (tensor parallelism inside each expert);
layers/linear.py `partition_spec` decides, the loader places. Under jit, GSPMD keeps each
device's experts local for every implementation (tokens are replicated; the HLO on 4
faked CPU devices gathers no expert weights, it all-reduces the (T, D) output), so no
shard_map is needed for correctness; whether an all-to-all token dispatch pays off is a
multi-GPU measurement still to make.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmm.kernels.grouped_matmul import grouped_matmul
from jaxmm.layers.linear import Linear
from jaxmm.layers.mlp import GatedMLP, activation

IMPLEMENTATIONS = ("dense", "ragged", "capacity", "gather")
# selectable by name, kept out of IMPLEMENTATIONS (the forms GSPMD partitions) until sharded
KERNEL_IMPLEMENTATIONS = ("pallas", "mosaic_gpu")
# ragged_dot_mgpu's tiles: rows of 64, columns of 128 (one per program), contraction of 64
MOSAIC_BLOCKS = dict(block_m=64, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)


def route(router_logits: jax.Array, top_k: int, norm_topk_prob: bool):
    """router_logits (T, E) -> weights (T, k) float32, expert ids (T, k) int32."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, ids.astype(jnp.int32)


def _combine(weights: jax.Array, y: jax.Array, dtype) -> jax.Array:
    """weights (T, k), y (T, k, D) -> (T, D): the router-weighted sum, in float32. Rows of
    weight zero (padding tokens) are dropped, not multiplied: they may hold anything."""
    y = jnp.where(weights[..., None] > 0, y.astype(jnp.float32), 0.0)
    return jnp.einsum("TK,TKD->TD", weights, y).astype(dtype)


def experts_dense(x, weights, ids, gate, up, down, act):
    """Every expert on every token (the oracle). x (T, D), weights/ids (T, k)."""
    E = gate.shape[0]
    combine = jnp.einsum("TKE,TK->TE", jax.nn.one_hot(ids, E, dtype=jnp.float32), weights)
    h = act(jnp.einsum("TD,EDF->TEF", x, gate)) * jnp.einsum("TD,EDF->TEF", x, up)
    y = jnp.einsum("TEF,EFD->TED", h, down)
    return jnp.einsum("TE,TED->TD", combine, y.astype(jnp.float32)).astype(x.dtype)


def _sort_rows(ids: jax.Array, E: int):
    """The T*k (token, slot) rows ordered by expert (stable: by token within an expert).

    Returns order (R,) row index of each sorted position, inverse (R,) sorted position of each
    row, sorted expert ids (R,) and group sizes (E,): rows per expert. Rows of id E (padding
    tokens) sort last and belong to no group."""
    flat = ids.reshape(-1)
    R = flat.shape[0]
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    inverse = jnp.zeros((R,), jnp.int32).at[order].set(jnp.arange(R, dtype=jnp.int32))
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    return order, inverse, flat[order], sizes


def experts_ragged(x, weights, ids, gate, up, down, act):
    """Rows sorted by expert, `jax.lax.ragged_dot` with the per-expert counts as groups."""
    T, k = ids.shape
    order, inverse, _, sizes = _sort_rows(ids, gate.shape[0])
    xs = x[order // k]  # (R, D) sorted by expert
    h = act(jax.lax.ragged_dot(xs, gate, sizes)) * jax.lax.ragged_dot(xs, up, sizes)
    ys = jax.lax.ragged_dot(h.astype(x.dtype), down, sizes)  # (R, D)
    return _combine(weights, ys[inverse].reshape(T, k, -1), x.dtype)


def experts_pallas(x, weights, ids, gate, up, down, act, blocks: dict | None = None):
    """`ragged` on our Pallas grouped GEMM (kernels/grouped_matmul.py) instead of XLA's.
    `blocks`: keyword arguments of the kernel (block sizes; default: its own choice)."""
    T, k = ids.shape
    order, inverse, _, sizes = _sort_rows(ids, gate.shape[0])
    gmm = functools.partial(grouped_matmul, group_sizes=sizes, **(blocks or {}))
    xs = x[order // k]  # (R, D) sorted by expert; padding tokens' rows last, in no group
    h = act(gmm(xs, gate)) * gmm(xs, up)
    ys = gmm(h.astype(x.dtype), down)  # (R, D)
    return _combine(weights, ys[inverse].reshape(T, k, -1), x.dtype)


def mosaic_gpu_supported(D: int, F: int, dtype, backend: str | None = None) -> bool:
    """Whether `mosaic_gpu` runs here: a Hopper GPU (the kernel uses wgmma), 16-bit weights,
    and D and F whole multiples of the column tile (every matmul's K and N are D or F)."""
    if (backend or jax.default_backend()) != "gpu" or jnp.dtype(dtype).itemsize != 2:
        return False
    n = MOSAIC_BLOCKS["block_n"]
    if D % n or F % n:
        return False
    kind = getattr(jax.devices()[0], "compute_capability", "")
    return str(kind).startswith("9")


def experts_mosaic_gpu(x, weights, ids, gate, up, down, act):
    """`ragged` with JAX's Mosaic GPU grouped GEMM in place of `jax.lax.ragged_dot`. Rows past
    the groups (padding tokens) come back unspecified; `_combine` drops them."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    T, k = ids.shape
    order, inverse, _, sizes = _sort_rows(ids, gate.shape[0])
    gmm = functools.partial(ragged_dot_mgpu.ragged_dot, group_sizes=sizes, **MOSAIC_BLOCKS)
    xs = x[order // k]  # (R, D) sorted by expert
    h = (act(gmm(xs, gate)) * gmm(xs, up)).astype(x.dtype)
    ys = gmm(h, down)  # (R, D)
    return _combine(weights, ys[inverse].reshape(T, k, -1), x.dtype)


def bucket_size(rows: int, E: int) -> int:
    """Rows per bucket of `capacity`: the expected rows of one expert as a power of two,
    16 to 128 (small enough to waste little padding, large enough for the matmul units)."""
    per_expert = -(-rows // E)
    return int(min(128, max(16, 1 << (per_expert - 1).bit_length())))


def num_buckets(rows: int, E: int, B: int) -> int:
    """Upper bound of sum_e ceil(n_e / B) over every routing of `rows` rows to E experts."""
    return rows // B + min(E, rows)


def experts_capacity(x, weights, ids, gate, up, down, act, bucket: int | None = None):
    """Sorted rows in fixed-size buckets, one expert per bucket; dense einsum per bucket."""
    T, k = ids.shape
    E, D, _ = gate.shape
    R = T * k
    B = bucket or bucket_size(R, E)
    nb = num_buckets(R, E, B)
    order, inverse, expert_of_row, sizes = _sort_rows(ids, E)
    padded = (sizes + B - 1) // B * B  # rows each expert takes once padded to whole buckets
    padded_end = jnp.cumsum(padded)
    start = jnp.cumsum(sizes) - sizes
    # slot of each sorted row in the bucketed layout: its expert's first slot + its rank;
    # padding tokens' rows (expert E) get a slot past the end, dropped when written
    e = jnp.minimum(expert_of_row, E - 1)
    dest = (padded_end - padded)[e] + jnp.arange(R) - start[e]
    dest = jnp.where(expert_of_row < E, dest, nb * B)
    token = jnp.full((nb * B,), T, jnp.int32).at[dest].set(order // k, mode="drop")
    xp = jnp.concatenate([x, jnp.zeros((1, D), x.dtype)])[token].reshape(nb, B, D)
    # expert of each bucket; buckets past the last expert's are all padding (zero rows)
    owner = jnp.searchsorted(padded_end, jnp.arange(nb) * B, side="right")
    owner = jnp.minimum(owner, E - 1)
    h = act(jnp.einsum("nBD,nDF->nBF", xp, gate[owner]))
    h = h * jnp.einsum("nBD,nDF->nBF", xp, up[owner])
    yp = jnp.einsum("nBF,nFD->nBD", h, down[owner]).reshape(nb * B, D)
    ys = yp.at[dest].get(mode="fill", fill_value=0)  # (R, D) sorted-row order
    return _combine(weights, ys[inverse].reshape(T, k, D), x.dtype)


def experts_gather(x, weights, ids, gate, up, down, act):
    """Each token's k expert matrices gathered; reads only the chosen experts."""
    h = act(jnp.einsum("TD,TKDF->TKF", x, gate[ids])) * jnp.einsum("TD,TKDF->TKF", x, up[ids])
    y = jnp.einsum("TKF,TKFD->TKD", h, down[ids])
    return _combine(weights, y, x.dtype)


_IMPLS = {
    "dense": experts_dense,
    "ragged": experts_ragged,
    "capacity": experts_capacity,
    "gather": experts_gather,
    "pallas": experts_pallas,
    "mosaic_gpu": experts_mosaic_gpu,
}


def default_impl(T: int, k: int, E: int, backend: str | None = None) -> str:
    """The implementation `auto` runs for a bucket of T tokens (static: no recompiles).

    GPU: `capacity` from 512 tokens (T*k >= 4096 rows), `ragged` below. On the H100
    (benchmarks/results/moe_layer_h100.jsonl, Qwen3-30B-A3B shape, bf16) at T=512: ragged
    7.08 ms, capacity 2.52, dense 1.64, mosaic_gpu 0.72; below 512 tokens the run kept no
    ragged/capacity rows, so the choice there stays `ragged` until measured. `mosaic_gpu`
    is the fastest measured but stays opt-in until its path with padding tokens (rows in no
    group) has run on a GPU; `dense` is not picked as it reads every expert. TPU: `ragged`.
    Not `gather` even for decode: the smallest token bucket is 16,
    and gathering 16 x k expert matrices writes and re-reads ~40x the bytes a batch-1
    token needs, where a grouped GEMM that skips empty groups reads each chosen expert
    once (padding tokens sit in no group, see `experts_forward`). CPU: `gather` for few
    rows (T*k <= E), `capacity` beyond; XLA's CPU ragged_dot is slower than even `dense`.
    Measured on the shared 2-core CPU host (E=32, k=4, D=256, F=128, float32, ms): T=4:
    gather 1.0, capacity 2.1, ragged 6.7, dense 11.8; T=64: capacity 13.8, dense 26.6,
    ragged 50.6, gather 180; T=512: capacity 160, dense 439, ragged 1292, gather 4207."""
    backend = backend or jax.default_backend()
    if backend == "gpu":
        return "capacity" if T * k >= 4096 else "ragged"
    if backend != "cpu":
        return "ragged"
    return "gather" if T * k <= E else "capacity"


def experts_forward(
    x, weights, ids, gate, up, down, act, impl: str = "auto", valid: jax.Array | None = None
) -> jax.Array:
    """Run the chosen experts with one implementation (see the module docstring).

    valid (T,) bool marks the step's real tokens: the rest pad the bucket and must not
    make the layer touch more experts (a batch-1 decode pads 1 token to 16, whose 15
    padding tokens would otherwise route to up to 120 more experts). Their rows get weight
    zero; the grouped forms put them in no group, `gather` repeats token 0's experts."""
    E = gate.shape[0]
    if impl == "auto":
        impl = default_impl(x.shape[0], ids.shape[1], E)
    if impl not in _IMPLS:
        choices = ("auto",) + IMPLEMENTATIONS + KERNEL_IMPLEMENTATIONS
        raise ValueError(f"MoE implementation {impl!r}; choose from {choices}")
    if impl == "mosaic_gpu" and not mosaic_gpu_supported(gate.shape[1], gate.shape[2], gate.dtype):
        raise ValueError(
            "MoE implementation 'mosaic_gpu' needs a Hopper GPU, 16-bit weights and the hidden "
            f"and expert widths multiples of 128 (got {gate.shape[1]}, {gate.shape[2]})"
        )
    if valid is not None:
        weights = jnp.where(valid[:, None], weights, 0.0)
        if impl in ("ragged", "capacity", "pallas", "mosaic_gpu"):
            ids = jnp.where(valid[:, None], ids, E)
        elif impl == "gather":
            ids = jnp.where(valid[:, None], ids, ids[:1])
    return _IMPLS[impl](x, weights, ids, gate, up, down, act)


class MoeExperts(nnx.Module):
    """E stacked gated-MLP experts: gate_proj/up_proj (E, D, F), down_proj (E, F, D)."""

    def __init__(self, E: int, D: int, F: int, *, dtype=jnp.float32, rngs):
        del rngs  # weights come from the checkpoint (or random_params)
        self.gate_proj = nnx.Param(jnp.zeros((E, D, F), dtype))
        self.up_proj = nnx.Param(jnp.zeros((E, D, F), dtype))
        self.down_proj = nnx.Param(jnp.zeros((E, F, D), dtype))


class SparseMoeBlock(nnx.Module):
    """Router `gate` + stacked `experts` (+ optional `shared_expert`, `shared_expert_gate`).

    HF attribute names of Qwen3-MoE's Qwen3MoeSparseMoeBlock (and Qwen2-MoE's shared expert),
    so checkpoint keys map 1:1 once weights/experts.py has stacked the experts."""

    def __init__(
        self,
        D: int,
        F: int,
        E: int,
        top_k: int,
        act: str,
        *,
        norm_topk_prob: bool,
        shared_F: int | None = None,
        impl: str = "auto",
        dtype=jnp.float32,
        rngs,
    ):
        if impl != "auto" and impl not in _IMPLS:
            raise ValueError(f"MoE implementation {impl!r}; choose from {tuple(_IMPLS)}")
        self.gate = Linear(D, E, dtype=dtype, rngs=rngs)
        self.experts = MoeExperts(E, D, F, dtype=dtype, rngs=rngs)
        if shared_F:
            self.shared_expert = GatedMLP(D, shared_F, act, dtype=dtype, rngs=rngs)
            self.shared_expert_gate = Linear(D, 1, dtype=dtype, rngs=rngs)
        self.has_shared = bool(shared_F)
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.act = act
        self.impl = impl

    def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        """x (T, D); valid (T,) bool, the bucket's real tokens (see `experts_forward`)."""
        weights, ids = route(self.gate(x), self.top_k, self.norm_topk_prob)
        e = self.experts
        out = experts_forward(
            x,
            weights,
            ids,
            e.gate_proj[...],
            e.up_proj[...],
            e.down_proj[...],
            activation(self.act),
            self.impl,
            valid,
        )
        if self.has_shared:
            out = out + jax.nn.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def num_experts(config) -> int:
    """E of an HF MoE config (`num_experts`; some configs name it `num_local_experts`)."""
    return int(getattr(config, "num_experts", None) or getattr(config, "num_local_experts", 0))


def is_sparse_layer(config, layer_idx: int) -> bool:
    """Whether layer `layer_idx` has a MoE block, as transformers' Qwen2/3-MoE decide it."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return (
        layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
        and num_experts(config) > 0
        and (layer_idx + 1) % step == 0
    )


def moe_block(config, *, dtype, impl: str = "auto", rngs) -> SparseMoeBlock:
    """The MoE block an HF Qwen2/3-MoE style config describes."""
    return SparseMoeBlock(
        config.hidden_size,
        config.moe_intermediate_size,
        num_experts(config),
        config.num_experts_per_tok,
        config.hidden_act,
        norm_topk_prob=bool(getattr(config, "norm_topk_prob", False)),
        shared_F=getattr(config, "shared_expert_intermediate_size", None) or None,
        impl=impl,
        dtype=dtype,
        rngs=rngs,
    )


def layer_mlp(config, layer_idx: int, *, dtype, impl: str = "auto", rngs) -> nnx.Module:
    """Layer `layer_idx`'s feed-forward: the MoE block or, per `mlp_only_layers` /
    `decoder_sparse_step`, a dense gated MLP of `intermediate_size`."""
    if is_sparse_layer(config, layer_idx):
        return moe_block(config, dtype=dtype, impl=impl, rngs=rngs)
    return GatedMLP(
        config.hidden_size, config.intermediate_size, config.hidden_act, dtype=dtype, rngs=rngs
    )
