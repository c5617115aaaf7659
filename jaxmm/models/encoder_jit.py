"""`encoder_jit`: how the media encoders' programs are compiled.

An encoder program runs once per media item on inputs of many thousand rows, so kernel
launch overhead is nothing to it. XLA's GPU command buffers (CUDA graphs) are then pure
cost: the buffers of each call are new, and updating the recorded graph for them took
5.4-5.8 ms per call of the Qwen2-VL-2B vision tower at 1344^2 on an H100, with the GPU idle
(`benchmarks/vlm_ttft.py --profile`, "gaps"). These programs are compiled without them.
The language model's step program keeps XLA's default (its decode steps are launch-bound).
JAXMM_ENCODER_COMMAND_BUFFERS=1 restores XLA's default for the encoders too (to compare).
"""

from __future__ import annotations

import functools
import os

import jax

# XLA debug option (also accepted, and ignored, by the CPU compiler): no command buffers
COMPILER_OPTIONS = (
    {}
    if os.environ.get("JAXMM_ENCODER_COMMAND_BUFFERS") == "1"
    else {"xla_gpu_enable_command_buffer": ""}
)


def encoder_jit(fn=None, **kwargs):
    """`jax.jit` with the encoders' compiler options; usable as `@encoder_jit`."""
    if fn is None:
        return functools.partial(encoder_jit, **kwargs)
    return jax.jit(fn, compiler_options=COMPILER_OPTIONS, **kwargs)
