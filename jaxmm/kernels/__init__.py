"""Attention kernels. Each kernel has a pure-JAX reference with the same signature.

`get_attention_fn(backend)` is the one switch:
  "reference"  pure-jnp gather + softmax over the whole page table (any backend; the oracle)
  "xla"        plain XLA with work proportional to the real context (`xla.py`)
  "pallas"     our Pallas kernels: GPU (Triton lowering), or on a TPU backend the TPU kernel;
               `interpret=True` runs them anywhere
  "pallas_tpu" the Pallas TPU (Mosaic) kernel (`tpu_ragged_paged_attention.py`); TPU
               interpret mode off TPU
  "auto"       on GPU "pallas", on TPU "pallas_tpu", each if a small probe compiles and
               matches the reference; else "xla" (CPU, or a failed probe)
"""

from __future__ import annotations

import functools
import logging

import jax

from jaxmm.kernels.reference import ragged_paged_attention as reference_attention

log = logging.getLogger(__name__)

BACKENDS = ("reference", "xla", "pallas", "pallas_tpu", "auto")


def get_attention_fn(backend: str = "auto"):
    """Return a function with the `reference.ragged_paged_attention` signature."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} not in {BACKENDS}")
    if backend == "reference":
        return reference_attention
    from jaxmm.kernels import xla
    from jaxmm.kernels.ragged_paged_attention import ragged_paged_attention

    if backend == "xla":
        return xla.ragged_paged_attention
    on_tpu = jax.default_backend() == "tpu"
    if backend == "pallas_tpu" or (backend == "pallas" and on_tpu):
        return _tpu_attention(interpret=not on_tpu)
    if backend == "pallas":
        return ragged_paged_attention
    if jax.default_backend() == "gpu" and _pallas_works():
        return ragged_paged_attention
    if on_tpu and _pallas_works("tpu"):
        return _tpu_attention(interpret=False)
    return xla.ragged_paged_attention


@functools.cache
def _tpu_attention(interpret: bool):
    """The TPU kernel; off TPU in TPU interpret mode (CPU tests)."""
    from jaxmm.kernels.tpu_ragged_paged_attention import ragged_paged_attention

    if interpret:
        return functools.partial(ragged_paged_attention, interpret=True)
    return ragged_paged_attention


@functools.cache
def _pallas_works(kind: str = "gpu") -> bool:
    """Compile and check a tiny mixed batch once per process (fallback if lowering fails).

    kind: "gpu" probes the Triton kernels, "tpu" the Mosaic TPU kernel. A passing verdict is
    kept in the persistent cache directory (keyed by jaxmm's source, JAX and the device), so
    a warm start skips the probe's ~2.5 s of tracing and compiling.
    """
    from jaxmm import disk_cache

    key = disk_cache.key_of("attention-probe", kind)
    if disk_cache.read("probe", key) == b"ok":
        return True
    works = _probe(kind)
    if works:
        disk_cache.write("probe", key, b"ok")
    return works


def _probe(kind: str) -> bool:
    import jax.numpy as jnp
    import numpy as np

    if kind == "tpu":
        from jaxmm.kernels.tpu_ragged_paged_attention import ragged_paged_attention
    else:
        from jaxmm.kernels.ragged_paged_attention import ragged_paged_attention

    try:
        rng = np.random.default_rng(0)
        T, N, K, H, G, A = 8, 8, 2, 64, 16, 8
        q, k, v = (jnp.asarray(rng.standard_normal((T, n, H)), jnp.bfloat16) for n in (N, K, K))
        kv = jnp.asarray(rng.standard_normal((2, K, A, G, H)), jnp.bfloat16)
        args = (
            q,
            k,
            v,
            kv,
            jnp.array([20, 7], jnp.int32),
            jnp.array([[0, 1], [2, 3]], jnp.int32),
            jnp.array([0, 1, 8], jnp.int32),
            jnp.array([2], jnp.int32),
        )
        got, _ = ragged_paged_attention(*args, sm_scale=0.125)
        want, _ = reference_attention(*args, sm_scale=0.125)
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
        if not err < 5e-2:
            log.warning("pallas attention probe mismatch (max err %g): using reference", err)
            return False
        return True
    except Exception as e:  # lowering missing or broken on this JAX / device
        log.warning("pallas attention unavailable (%s): using reference", e)
        return False
