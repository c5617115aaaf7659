"""The attention-backend switch: a name from `ATTENTION_BACKENDS` -> a function with the
`reference.ragged_paged_attention` signature.

`resolve(name)` turns a name into the concrete backend of this process's device ("auto"
after a probe; "pallas" on TPU is "pallas_tpu"). The runner keeps that concrete name: models
are built with it and it is part of the saved-program key. `attention_fn(name)` returns the
function. JAXMM_PREFILL_KERNEL=triton (deprecated) still turns a resolved "pallas" into
"pallas_triton"; "auto" and "mosaic" leave it as it is.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings

import jax

from jaxmm.kernels import check_attention_backend
from jaxmm.kernels.reference import ragged_paged_attention as reference_attention

log = logging.getLogger(__name__)

PREFILL_KERNEL_ENV = "JAXMM_PREFILL_KERNEL"  # deprecated alias, read by `resolve`


def resolve(name: str = "auto") -> str:
    """The concrete backend `name` means here (never "auto")."""
    check_attention_backend(name)
    platform = jax.default_backend()
    if name == "auto":
        if platform == "gpu" and pallas_works("gpu"):
            name = "pallas"
        elif platform == "tpu" and pallas_works("tpu"):
            name = "pallas_tpu"
        else:
            name = "xla"
    if name == "pallas" and platform == "tpu":
        name = "pallas_tpu"
    prefill = os.environ.get(PREFILL_KERNEL_ENV)
    if prefill is not None:
        if prefill not in ("auto", "mosaic", "triton"):
            raise ValueError(f"{PREFILL_KERNEL_ENV}={prefill!r}: auto, mosaic or triton")
        warnings.warn(
            f"{PREFILL_KERNEL_ENV} is deprecated: use attention_backend='pallas_triton' for "
            "the Triton prefill kernel, 'pallas' for the default choice",
            FutureWarning,
            stacklevel=2,
        )
        if prefill == "triton" and name == "pallas":
            name = "pallas_triton"
    return name


@functools.cache
def attention_fn(backend: str):
    """The function for `backend` ("auto" is resolved first)."""
    if backend == "auto":
        backend = resolve(backend)
    check_attention_backend(backend)
    platform = jax.default_backend()
    if backend == "reference":
        return reference_attention
    if backend == "xla":
        from jaxmm.kernels import xla

        return xla.ragged_paged_attention
    if backend == "pallas_tpu" or (backend == "pallas" and platform == "tpu"):
        return _tpu_attention(interpret=platform != "tpu")
    from jaxmm.kernels.gpu.ragged_paged_attention import ragged_paged_attention

    kw = {}
    if platform != "gpu":  # interpret mode (CPU tests)
        kw["interpret"] = True
    if backend == "pallas_triton":
        kw["prefill_kernel"] = "triton"
    return functools.partial(ragged_paged_attention, **kw) if kw else ragged_paged_attention


@functools.cache
def _tpu_attention(interpret: bool):
    """The TPU kernel; off TPU in TPU interpret mode (CPU tests)."""
    from jaxmm.kernels.tpu.ragged_paged_attention import ragged_paged_attention

    if interpret:
        return functools.partial(ragged_paged_attention, interpret=True)
    return ragged_paged_attention


@functools.cache
def pallas_works(kind: str = "gpu") -> bool:
    """Compile and check a tiny mixed batch once per process (fallback if lowering fails).

    kind: "gpu" probes the Triton kernels, "tpu" the Mosaic TPU kernel. A passing verdict is
    kept in the persistent cache directory (keyed by jaxmm's source, JAX and the device), so
    a warm start skips the probe's ~2.5 s of tracing and compiling.
    """
    from jaxmm import disk_cache

    key = disk_cache.key_of("attention-probe", kind)
    if disk_cache.read("probe", key) == b"ok":
        return True
    works = probe(kind)
    if works:
        disk_cache.write("probe", key, b"ok")
    return works


def probe(kind: str) -> bool:
    """Run a tiny mixed batch through our Pallas kernel for `kind` and compare with the
    reference; False (with a warning) if it fails to lower or disagrees."""
    import jax.numpy as jnp
    import numpy as np

    if kind == "tpu":
        from jaxmm.kernels.tpu.ragged_paged_attention import ragged_paged_attention
    else:
        from jaxmm.kernels.gpu.ragged_paged_attention import ragged_paged_attention

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
            log.warning("pallas attention probe mismatch (max err %g): using xla", err)
            return False
        return True
    except Exception as e:  # lowering missing or broken on this JAX / device
        log.warning("pallas attention unavailable (%s): using xla", e)
        return False
