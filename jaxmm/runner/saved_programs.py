"""Compiled programs saved whole, so a warm start loads them instead of tracing them again.

`jax.jit` with a persistent compilation cache still traces and lowers every program in
Python on each start (its cache key is a hash of the lowered module): for the 8B model's
nine step programs that is ~16 s of a warm start-up. `SavedPrograms` wraps a jitted
function and, for the signatures warmup prepares, keeps a `jax.stages.Compiled` per
signature:

1. `prepare(sig, args, static)`: look for a saved program under a key made of
   `disk_cache.environment_key()` (jaxmm's source, JAX, device, flags), the caller's salt
   (the model config, dtype, the resolved attention backend: the one switch's concrete
   value, which also fixes the prefill kernel, `jaxmm.kernels.backends.resolve`; ...) and
   the exact abstract arguments (tree structure, shapes, dtypes, shardings). On a hit it
   is deserialized and loaded: no trace, no lowering, no XLA. On a miss the function is
   lowered and compiled ahead of time (XLA itself still goes through JAX's persistent
   cache) and the result is saved.
2. `__call__(sig, *args, **static)`: the prepared program for `sig` when there is one (the
   call is as cheap as jit's), otherwise the plain jitted function.

A saved program that fails to load (truncated file, a JAX that cannot read it) is deleted
and rebuilt. Without a persistent cache directory nothing is saved and `prepare` only
compiles ahead of time. Nor on the CPU backend: XLA:CPU programs loaded back from bytes
were seen to fail at run time (JAX 0.10.2: "Function wrapped_iota not found"), so on CPU
programs are compiled ahead of time and kept in memory only.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Hashable

import jax
import numpy as np
from jax.experimental import serialize_executable

from jaxmm import disk_cache

logger = logging.getLogger(__name__)


def abstract_signature(args, static: dict) -> tuple:
    """What a compiled program is specialised to: tree structure, and each leaf's shape,
    dtype and sharding (numpy leaves are placed by the call: no sharding)."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    avals = []
    for x in leaves:
        sharding = getattr(x, "sharding", None) if isinstance(x, jax.Array) else None
        weak = bool(getattr(x, "weak_type", False))
        dtype = str(getattr(x, "dtype", type(x).__name__))
        avals.append((tuple(np.shape(x)), dtype, str(sharding), weak))
    return (str(tree), tuple(avals), tuple(sorted(static.items())))


def saving_supported() -> bool:
    return jax.default_backend() in ("gpu", "tpu")


class SavedPrograms:
    def __init__(self, name: str, jitted, salt: Hashable):
        self.name = name
        self.jitted = jitted
        self.salt = salt
        self.programs: dict[Hashable, jax.stages.Compiled] = {}
        self.sources: dict[str, int] = {"disk": 0, "compiled": 0}

    def __len__(self) -> int:
        return len(self.programs)

    def __call__(self, sig: Hashable, *args, **static):
        program = self.programs.get(sig)
        if program is not None:
            return program(*args)
        return self.jitted(*args, **static)

    def prepare(self, sig: Hashable, args: tuple, static: dict | None = None) -> str:
        """Make `sig`'s program ready; returns where it came from ("disk" or "compiled")."""
        static = dict(static or {})
        key = disk_cache.key_of(self.name, self.salt, abstract_signature(args, static))
        program = self._load(key)
        source = "disk"
        if program is None:
            source = "compiled"
            program = self.jitted.lower(*args, **static).compile()
            self._save(key, program)
        self.programs[sig] = program
        self.sources[source] += 1
        return source

    def _load(self, key: str) -> jax.stages.Compiled | None:
        if not saving_supported():
            return None
        data = disk_cache.read("program", key)
        if data is None:
            return None
        try:
            payload, in_tree, out_tree = pickle.loads(data)
            return serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
        except Exception as e:  # torn or foreign entry: rebuild it
            logger.warning("saved program %s unusable (%s): compiling it again", key, e)
            disk_cache.forget("program", key)
            return None

    def _save(self, key: str, program: jax.stages.Compiled) -> None:
        if not saving_supported() or disk_cache.cache_dir() is None:
            return
        try:
            data = pickle.dumps(serialize_executable.serialize(program))
        except Exception as e:  # a backend without executable serialization
            logger.info("cannot save program %s (%s): it will be traced on every start", key, e)
            return
        disk_cache.write("program", key, data)
