"""Ragged paged attention in Pallas: the same contract as `reference.ragged_paged_attention`.

One call serves a whole step (decodes first, then prefill chunks, then padding):

1. KV write (`kv_write`): a one-program-per-token Pallas copy into the pages, in place when
   the caller donates kv_pages (an XLA scatter is the alternative; see KV_WRITE).
2. Decode kernel (`decode.py`): flash-decoding over rows s < num_decodes, where
   num_decodes is the length of the leading run of q_len == 1 sequences (computed on
   device). All query heads of a KV group share one tile; long contexts are split over J
   programs and merged in XLA ("per_seq"), or cut into equal work items over the whole
   batch and merged by a second small kernel ("balanced"; `decode_options`). On Hopper,
   "mosaic" (opt-in) runs the balanced items in a Mosaic GPU kernel (`decode_mgpu.py`).
3. Prefill kernel (`prefill.py`, or `prefill_mgpu.py` on Hopper: see below):
   FlashAttention-2 over query blocks of every other sequence (a q_len == 1 sequence after
   a prefill lands here too: correct, just slower), plus the padding tokens, which it
   writes as zeros. It runs first and produces `out`.
4. The decode kernel then writes its rows straight into `out` (aliased in and out), or,
   with split-K, its merged partials through an in-place dynamic-update-slice (or the
   combine kernel, aliased too).

The decode kernel and the fallback prefill kernel use Pallas' Triton lowering; the Hopper
prefill kernel and the opt-in Mosaic decode kernel use the Mosaic GPU lowering. All run in
interpret mode anywhere (`interpret=True`, used by the CPU tests). Which prefill kernel runs
is `prefill_kernel` ("auto": Mosaic GPU on Hopper where it takes the shapes, else Triton;
the attention backend "pallas_triton" passes "triton"). Tile sizes and split counts are
static choices from the shapes (see `make_plan`); `decode_options` (a
`decode.DecodeOptions`) pins the decode ones, for sweeps.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxmm.kernels.gpu import decode, decode_mgpu, prefill, prefill_mgpu
from jaxmm.kernels.gpu.decode import DecodeOptions
from jaxmm.kernels.kv_write import write_kv_pallas, write_kv_xla
from jaxmm.kernels.reference import ragged_paged_attention as reference_attention

# How this step's K/V reach the pages (docs/performance.md: "KV write").
KV_WRITE = "pallas"
# `prefill_kernel` values: "auto" (Mosaic GPU on Hopper where it takes the shapes, else
# Triton), "mosaic" (wherever it takes the shapes) or "triton".
PREFILL_KERNELS = ("auto", "mosaic", "triton")


@dataclasses.dataclass(frozen=True)
class Plan:
    decode_block_k: int
    num_splits: int
    decode_warps: int
    decode_stages: int
    prefill_block_q: int
    prefill_block_k: int
    prefill_programs: int
    prefill_warps: int
    prefill_stages: int
    gather: str = "page"  # how a KV block is gathered (decode.load_kv_block)
    # Decode work split (decode module docstring); the last three: "balanced" only.
    split_mode: str = "per_seq"
    decode_programs: int = 528  # target programs in all: 4 per SM of an H100
    min_blocks_per_split: int = 2
    longest_first: bool = True
    # "mosaic": the Hopper prefill kernel (prefill_mgpu), "triton": prefill
    prefill_impl: str = "triton"


def _pow2_floor(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


def _num_cores(interpret: bool) -> int:
    if interpret:
        return 4  # interpret mode runs programs one after another: keep the grid small
    d = jax.devices()[0]
    return int(getattr(d, "core_count", 0) or 132)


def _hopper() -> bool:
    d = jax.devices()[0]
    return d.platform == "gpu" and str(getattr(d, "compute_capability", "")).startswith("9.")


def _prefill_impl(prefill_kernel, H, G, dtype, window, cap, interpret) -> str:
    if prefill_kernel not in PREFILL_KERNELS:
        raise ValueError(f"prefill_kernel {prefill_kernel!r} not in {PREFILL_KERNELS}")
    if prefill_kernel == "triton" or interpret:
        return "triton"
    takes = prefill_mgpu.supported(H, G, dtype, window, cap)
    if prefill_kernel == "mosaic":
        return "mosaic" if takes else "triton"
    return "mosaic" if takes and _hopper() else "triton"


def make_plan(
    T,
    N,
    K,
    S,
    P,
    G,
    H,
    dtype,
    interpret,
    overrides,
    decode_options=None,
    window=None,
    cap=None,
    prefill_kernel="auto",
) -> Plan:
    """Static tile/grid choices (H100 sweeps in docs/performance.md).

    `overrides`: Plan fields to replace; `decode_options`: a DecodeOptions, applied last.
    """
    cores = _num_cores(interpret)
    small = jnp.dtype(dtype).itemsize <= 2 and H <= 128
    # Decode: 64-token KV blocks, 3 pipeline stages, 4 warps (best of the B=64, L=2048 sweep;
    # 128 x 8 warps ties). 2 x 3 stages x 16 KB tiles fit two programs per SM.
    dbk = min(64, _pow2_floor(P * G))
    max_blocks = max(P * G // dbk, 1)
    splits = decode.choose_num_splits(min(S, T), K, max_blocks, cores)
    # Prefill: 128 x 128 tiles, 8 warps (64 x 64, 4 warps at fp32 / large heads).
    bq = 128 if small else 64
    bq = min(bq, max(_pow2_floor(T), 16))
    pbk = min(128 if small else 64, _pow2_floor(P * G))
    if interpret:
        dbk, bq, pbk = min(dbk, 16), min(bq, 16), min(pbk, 16)
        splits = min(splits, 2)
    plan = Plan(
        decode_block_k=dbk,
        num_splits=splits,
        decode_warps=4,
        decode_stages=3,
        prefill_block_q=bq,
        prefill_block_k=pbk,
        prefill_programs=2 * cores,
        prefill_warps=8 if bq >= 128 else 4,
        prefill_stages=2,
        decode_programs=4 * cores,
        prefill_impl=_prefill_impl(prefill_kernel, H, G, dtype, window, cap, interpret),
    )
    plan = dataclasses.replace(plan, **(overrides or {}))
    if decode_options is not None:
        names = dict(block_k="decode_block_k", num_warps="decode_warps", num_stages="decode_stages")
        pinned = {
            names.get(f.name, f.name): getattr(decode_options, f.name)
            for f in dataclasses.fields(decode_options)
            if getattr(decode_options, f.name) is not None
        }
        if "programs_per_core" in pinned:
            pinned["decode_programs"] = pinned.pop("programs_per_core") * cores
        plan = dataclasses.replace(plan, **pinned)
    return plan


def decode_kwargs(plan: Plan) -> dict:
    """The static arguments of `decode.decode_attention` a plan picks."""
    return dict(
        block_k=plan.decode_block_k,
        num_splits=plan.num_splits,
        num_warps=plan.decode_warps,
        num_stages=plan.decode_stages,
        gather=plan.gather,
        split_mode=plan.split_mode,
        num_programs=plan.decode_programs,
        min_blocks_per_split=plan.min_blocks_per_split,
        longest_first=plan.longest_first,
    )


def supported(q_shape, kv_pages_shape) -> bool:
    """Shapes the Triton tiles take: power-of-two head dim (>= 16), page size, KV heads."""
    H = q_shape[-1]
    _, K, _, G, _ = kv_pages_shape

    def pow2(x):
        return x & (x - 1) == 0

    return H >= 16 and pow2(H) and pow2(G) and pow2(K)


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale",
        "sliding_window",
        "soft_cap",
        "interpret",
        "decode_options",
        "prefill_kernel",
    ),
)
def ragged_paged_attention(
    q,
    k,
    v,
    kv_pages,
    kv_lens,
    page_indices,
    cu_q_lens,
    num_seqs,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    interpret: bool = False,
    decode_options: DecodeOptions | None = None,
    prefill_kernel: str = "auto",
):
    """Pallas ragged paged attention; see `reference.ragged_paged_attention` for the contract.

    Shapes the kernels don't take (`supported`) go to the pure-JAX reference.
    `decode_options`: decode-kernel choices to pin (default: the plan's, from the shapes).
    `prefill_kernel`: one of PREFILL_KERNELS (the module docstring).
    """
    if not supported(q.shape, kv_pages.shape):
        return reference_attention(
            q,
            k,
            v,
            kv_pages,
            kv_lens,
            page_indices,
            cu_q_lens,
            num_seqs,
            sm_scale=sm_scale,
            sliding_window=sliding_window,
            soft_cap=soft_cap,
        )
    if KV_WRITE == "pallas":
        kv_pages = write_kv_pallas(
            k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, interpret=interpret
        )
    else:
        kv_pages = write_kv_xla(k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    out = paged_attention(
        q,
        kv_pages,
        kv_lens,
        page_indices,
        cu_q_lens,
        num_seqs,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        interpret=interpret,
        decode_options=decode_options,
        prefill_kernel=prefill_kernel,
    )
    return out, kv_pages


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale",
        "sliding_window",
        "soft_cap",
        "interpret",
        "plan",
        "decode_options",
        "prefill_kernel",
    ),
)
def paged_attention(
    q,
    kv_pages,
    kv_lens,
    page_indices,
    cu_q_lens,
    num_seqs,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    interpret: bool = False,
    plan: tuple | None = None,
    decode_options: DecodeOptions | None = None,
    prefill_kernel: str = "auto",
):
    """Attention over pages that already hold this step's K/V (no write). (T, N, H) out.

    `plan`: optional tuple of (field, value) overrides of the static tiling (benchmarks);
    `decode_options` (applied after it) and `prefill_kernel`: as in ragged_paged_attention.
    """
    T, N, H = q.shape
    _, K, A, G, _ = kv_pages.shape
    S, P = page_indices.shape
    if N % K:
        raise ValueError(f"query heads {N} not a multiple of KV heads {K}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError("sliding_window must be >= 1")
    p = make_plan(
        T,
        N,
        K,
        S,
        P,
        G,
        H,
        q.dtype,
        interpret,
        dict(plan or ()),
        decode_options,
        sliding_window,
        soft_cap,
        prefill_kernel,
    )
    kv_lens = kv_lens.astype(jnp.int32)
    page_indices = page_indices.astype(jnp.int32)
    cu_q_lens = cu_q_lens.astype(jnp.int32)
    num_seqs = num_seqs.astype(jnp.int32).reshape(1)

    # Leading run of single-token sequences = the decode rows [0, num_decodes).
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    live = jnp.arange(S) < num_seqs[0]
    is_dec = (q_lens == 1) & live
    num_decodes = jnp.sum(jnp.cumprod(is_dec.astype(jnp.int32))).reshape(1).astype(jnp.int32)
    owned = live & (jnp.arange(S) >= num_decodes[0])

    # Prefill / mixed part (also zero-fills padding tokens).
    mosaic = p.prefill_impl == "mosaic"
    if mosaic and not prefill_mgpu.supported(H, G, q.dtype, sliding_window, soft_cap):
        raise ValueError("the Mosaic GPU prefill kernel does not take these shapes/options")
    bq = prefill_mgpu.ROWS if mosaic else p.prefill_block_q
    num_work = pl_cdiv(T, bq) + min(S, T) + 1
    meta, count = prefill.build_work_list(
        q_lens, kv_lens, cu_q_lens, num_seqs, owned, T, bq, num_work
    )
    if mosaic:
        out = prefill_mgpu.prefill_attention(
            q,
            kv_pages,
            page_indices,
            meta,
            count,
            sm_scale=sm_scale,
            num_programs=_num_cores(interpret),
            interpret=interpret,
        )
        # XLA's GPU compiler cannot take a Mosaic GPU call's result as the target of the
        # decode rows' in-place update (DynamicSliceFusion, JAX 0.11.2): keep it apart.
        out = jax.lax.optimization_barrier(out)
    else:
        out = prefill.prefill_attention(
            q,
            kv_pages,
            page_indices,
            meta,
            count,
            sm_scale=sm_scale,
            sliding_window=sliding_window,
            soft_cap=soft_cap,
            block_q=bq,
            block_k=p.prefill_block_k,
            num_programs=p.prefill_programs,
            num_warps=p.prefill_warps,
            num_stages=p.prefill_stages,
            gather=p.gather,
            interpret=interpret,
        )
    # Decode rows [0, num_decodes), written over `out` in place.
    if p.split_mode == "mosaic":
        if not decode_mgpu.supported(
            H, G, N // K, p.decode_block_k, q.dtype, sliding_window, soft_cap
        ):
            raise ValueError("the Mosaic GPU decode kernel does not take these shapes/options")
        return decode_mgpu.decode_attention(
            q,
            kv_pages,
            kv_lens,
            page_indices,
            num_decodes,
            out,
            num_seqs=S,
            sm_scale=sm_scale,
            block_k=p.decode_block_k,
            steps=p.decode_stages,
            num_programs=_num_cores(interpret),
            target_items=pl_cdiv(p.decode_programs, K),
            min_blocks_per_split=p.min_blocks_per_split,
            interpret=interpret,
        )
    return decode.decode_attention(
        q,
        kv_pages,
        kv_lens,
        page_indices,
        num_decodes,
        out,
        num_seqs=S,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        interpret=interpret,
        **decode_kwargs(p),
    )


def pl_cdiv(a: int, b: int) -> int:
    return -(-a // b)
