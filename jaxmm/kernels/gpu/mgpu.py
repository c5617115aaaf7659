"""Helpers shared by the Mosaic GPU kernels (`decode_mgpu.py`, `prefill_mgpu.py`).

Both kernels run natively on Hopper and, for the CPU tests, under Pallas' Mosaic GPU
interpreter. The interpreter has no register layouts, so every layout-specific op goes
through one of these helpers, which drop the layout when `interpret` is set.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

LOG2E = math.log2(math.e)
M_INIT = -1e30  # finite: a fully masked row gives exp2(-inf - m) = 0, never NaN


def interpret_params():
    """The Mosaic GPU interpreter's settings for the tests."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    # TMA reads past an array end are zeros on the GPU; here they read NaN (stricter)
    return InterpretGPUParams(out_of_bounds_reads="uninitialized")


def with_layout(x, layout, interpret: bool):
    """x in a register layout (the interpreter has no layouts)."""
    return x if interpret else plgpu.layout_cast(x, layout)


def iota(shape, dim, interpret: bool):
    """int32 iota along `dim`, in the wgmma accumulator's layout."""
    if interpret:
        return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def bcast_rows(x, shape):
    """(R,) -> (R, C), in the row-reduced layout's parent."""
    return lax.broadcast_in_dim(x, shape, [0])
