"""Attention kernels, sorted by target; each has a pure-JAX reference with the same signature.

    reference.py   the ragged paged attention contract in pure jnp (any backend; the oracle)
    xla.py         plain XLA with work proportional to the real context (the CPU default)
    kv_write.py    this step's K/V into the pages: an XLA scatter or a Pallas copy
    backends.py    the attention-backend switch: a name below -> a function with the contract
    gpu/           Pallas GPU kernels: Triton and Mosaic GPU decode/prefill, the helpers the
                   Mosaic kernels share (mgpu.py), the GPU wrapper (ragged_paged_attention.py)
    tpu/           the Pallas TPU (Mosaic) kernel

`ATTENTION_BACKENDS` is the one list of `attention_backend` values, for `LLM(...)`,
`jaxmm serve --attention-backend` and `ModelConfig`:

    "auto"           on GPU "pallas", on TPU "pallas_tpu", each if a small probe compiles and
                     matches the reference; else "xla" (CPU, or a failed probe)
    "reference"      pure-jnp gather + softmax over the whole page table
    "xla"            `xla.py`
    "pallas"         our Pallas kernels for this device: on GPU Triton decode, and prefill by
                     the Mosaic GPU kernel on Hopper where it takes the shapes (else Triton);
                     on TPU the TPU kernel. Off its device it runs in interpret mode (tests)
    "pallas_triton"  "pallas" on GPU with every kernel Triton-lowered (the prefill too)
    "pallas_tpu"     the Pallas TPU kernel; TPU interpret mode off TPU

This module imports nothing (no JAX), so the config and the CLI can read the list cheaply.
"""

from __future__ import annotations

ATTENTION_BACKENDS = ("auto", "reference", "xla", "pallas", "pallas_triton", "pallas_tpu")


def check_attention_backend(name: str) -> str:
    """`name` if it is one of ATTENTION_BACKENDS, else ValueError (the one validation)."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}; got {name!r}")
    return name
