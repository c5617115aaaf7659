"""Process-level runner set-up: the device mesh, the persistent compilation cache, the
compile counter behind the no-recompile guard, and the token buckets."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh

from jaxmm.runner.batch import next_pow2

MIN_BUCKET = 16


_BACKEND_COMPILES = [0]


def _on_event(event: str, *args, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _BACKEND_COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


def backend_compile_count() -> int:
    """XLA compilations in this process so far (the compile guard's counter)."""
    return _BACKEND_COMPILES[0]


# data-parallel replicas that share a host's devices use those from this index on (set by
# `jaxmm.engine.data_parallel` for each replica's engine process)
FIRST_DEVICE_ENV = "JAXMM_FIRST_DEVICE"
# "0": run attention without the shard_map wrapper at tensor-parallel size 1 (benchmarks
# measure what the wrapper costs; larger sizes always need it)
SHARD_MAP_ENV = "JAXMM_ATTENTION_SHARD_MAP"


def make_mesh(tensor_parallel_size: int) -> Mesh:
    """A (1, tp) mesh with axes ("data", "model") over tp visible devices: the first ones, or
    those from $JAXMM_FIRST_DEVICE on. Under `jax.distributed` the devices are every
    process's, in process order, so a mesh may span hosts."""
    first = int(os.environ.get(FIRST_DEVICE_ENV, "0") or 0)
    devices = jax.devices()
    if first + tensor_parallel_size > len(devices):
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} from device {first} on, but only "
            f"{len(devices)} devices are visible"
        )
    picked = np.array(devices[first : first + tensor_parallel_size])
    return Mesh(picked.reshape(1, tensor_parallel_size), ("data", "model"))


def enable_compilation_cache(path: str | None) -> None:
    path = path or os.environ.get("JAXMM_CACHE_DIR")
    if not path:
        return
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def token_buckets(max_num_batched_tokens: int) -> list[int]:
    """Padded step sizes: 16, 32, ... 1024, then 1536, 2048, 3072, 4096, ... up to the first
    that holds max_num_batched_tokens. Above 1,024 tokens a step is compute-bound, so padding
    costs in proportion: 1.5x steps cap it at 33% instead of 50% (a 2,334-token prompt runs
    in 3,072, not 4,096) for one more program per octave."""
    buckets = [MIN_BUCKET]
    while buckets[-1] < max_num_batched_tokens:
        b = buckets[-1]
        buckets.append(b * 3 // 2 if b >= 1024 and b & (b - 1) == 0 else next_pow2(b + 1))
    return buckets
