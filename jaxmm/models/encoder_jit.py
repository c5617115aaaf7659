"""`encoder_jit`: `jax.jit` without XLA's GPU command buffers, for large encoder calls.

A vision-tower call over many thousand patches runs once per image, with kernels long
enough that launch overhead is nothing to it. XLA's command buffers (CUDA graphs) are then
pure cost: each call's buffers are new, and updating the recorded graph for them took
5.4-5.8 ms per call of the Qwen2-VL-2B vision tower at 1344^2 on an H100, with the GPU idle
(`benchmarks/vlm_ttft.py --profile`, "gaps"); without them the tower took 63.8 instead of
69.6 ms. Small calls (448^2) and the language model's step program keep XLA's default.
JAXMM_ENCODER_COMMAND_BUFFERS=1 restores XLA's default for the encoders too (to compare).
"""

from __future__ import annotations

import os

import jax

# XLA debug option (also accepted, and ignored, by the CPU compiler): no command buffers
COMPILER_OPTIONS = (
    {}
    if os.environ.get("JAXMM_ENCODER_COMMAND_BUFFERS") == "1"
    else {"xla_gpu_enable_command_buffer": ""}
)


def encoder_jit(fn, **kwargs):
    """`jax.jit` with the encoders' compiler options."""
    return jax.jit(fn, compiler_options=COMPILER_OPTIONS, **kwargs)
