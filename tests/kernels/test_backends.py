"""The one attention-backend switch: one list of names, validated in one place, each name
resolved to a concrete backend and a function with the reference's contract."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmm.kernels import ATTENTION_BACKENDS, backends, check_attention_backend, reference, xla
from jaxmm.kernels.gpu import ragged_paged_attention as rpa
from jaxmm.kernels.tpu import ragged_paged_attention as tpu
from tests.kernels.gpu.test_ragged_paged_attention import make_batch

on_cpu = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU choices")


def test_config_and_cli_take_the_one_list():
    from jaxmm.cli import build_parser
    from jaxmm.config import ModelConfig

    parser = build_parser()
    for name in ATTENTION_BACKENDS:
        assert check_attention_backend(name) == name
        assert ModelConfig(model="m", attention_backend=name).attention_backend == name
        assert parser.parse_args(["serve", "--attention-backend", name]).attention_backend == name
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        ModelConfig(model="m", attention_backend="flash")
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--attention-backend", "flash"])


@on_cpu
def test_resolve_on_cpu():
    from jaxmm.layers.attention import resolve_backend

    assert backends.resolve("auto") == "xla"
    for name in ("reference", "xla", "pallas", "pallas_triton", "pallas_tpu"):
        assert backends.resolve(name) == name
        assert resolve_backend(name) == name
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        backends.resolve("pallas_interpret")


@on_cpu
def test_functions_on_cpu():
    """Off their device the Pallas kernels run interpreted; pallas_triton pins the prefill."""
    fn = backends.attention_fn
    assert fn("reference") is reference.ragged_paged_attention
    assert fn("xla") is xla.ragged_paged_attention
    assert fn("auto") is xla.ragged_paged_attention
    pallas, triton, on_tpu = fn("pallas"), fn("pallas_triton"), fn("pallas_tpu")
    assert pallas.func is rpa.ragged_paged_attention and pallas.keywords == {"interpret": True}
    assert triton.func is rpa.ragged_paged_attention
    assert triton.keywords == {"interpret": True, "prefill_kernel": "triton"}
    assert on_tpu.func is tpu.ragged_paged_attention and on_tpu.keywords == {"interpret": True}
    with pytest.raises(ValueError):
        fn("nope")
    # the pinned prefill kernel reaches the jitted call as a static argument
    args = make_batch([1, 5], [6, 5], num_tokens=8)
    got, _ = triton(*args, sm_scale=0.125)
    with jax.default_matmul_precision("highest"):
        want, _ = reference.ragged_paged_attention(*args, sm_scale=0.125)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_prefill_kernel_choice():
    """Which prefill kernel a compiled (not interpreted) call picks, from the shapes."""
    plan = functools.partial(rpa.make_plan, 256, 32, 8, 4, 64, 16, 128, jnp.bfloat16, False, None)
    assert plan(prefill_kernel="triton").prefill_impl == "triton"
    assert plan(prefill_kernel="mosaic").prefill_impl == "mosaic"
    d = jax.devices()[0]
    hopper = d.platform == "gpu" and str(getattr(d, "compute_capability", "")).startswith("9.")
    assert plan(prefill_kernel="auto").prefill_impl == ("mosaic" if hopper else "triton")
    # shapes the Mosaic kernel does not take (head dim 80, a soft cap) stay on Triton
    assert (
        rpa.make_plan(
            256, 32, 8, 4, 64, 16, 80, jnp.bfloat16, False, None, prefill_kernel="mosaic"
        ).prefill_impl
        == "triton"
    )
    assert plan(cap=30.0, prefill_kernel="mosaic").prefill_impl == "triton"
    with pytest.raises(ValueError, match="prefill_kernel"):
        plan(prefill_kernel="cudnn")


@on_cpu
def test_deprecated_prefill_env(monkeypatch):
    monkeypatch.setenv(backends.PREFILL_KERNEL_ENV, "triton")
    with pytest.warns(FutureWarning, match="pallas_triton"):
        assert backends.resolve("pallas") == "pallas_triton"
    with pytest.warns(FutureWarning):
        assert backends.resolve("auto") == "xla"  # no Pallas on CPU: nothing to pin
    monkeypatch.setenv(backends.PREFILL_KERNEL_ENV, "mosaic")
    with pytest.warns(FutureWarning):
        assert backends.resolve("pallas") == "pallas"
    monkeypatch.setenv(backends.PREFILL_KERNEL_ENV, "fast")
    with pytest.raises(ValueError, match="JAXMM_PREFILL_KERNEL"):
        backends.resolve("pallas")
