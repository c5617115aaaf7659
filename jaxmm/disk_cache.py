"""Files jaxmm keeps beside JAX's persistent compilation cache, to start faster the next time.

JAX's cache (`compilation_cache_dir` / `JAXMM_CACHE_DIR`) skips XLA's compilation, but every
start still traces and lowers each program in Python to compute its key: ~16 s of a warm
8B start-up on an H100 (docs/performance.md). jaxmm keeps, under `<cache dir>/jaxmm/`:

- whole compiled programs (`jaxmm.runner.saved_programs`), loaded without tracing;
- small verdicts such as the attention-kernel probe's.

Every entry is keyed by `environment_key()` (jaxmm's own source, JAX, the device, the
flags that change a program) plus what the caller adds, so an edit to jaxmm, an upgrade or
another GPU simply misses and rebuilds. Entries are written to a temporary file and renamed,
so a crash never leaves a torn one. Plain Python: no JAX import at module level.

Like JAX's own cache, the directory is trusted: loading a saved program runs what it holds.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile

_JAXMM_DIR = os.path.dirname(os.path.abspath(__file__))


def cache_dir() -> str | None:
    """`<JAX's persistent cache dir>/jaxmm`, or None when no persistent cache is configured."""
    import jax

    base = jax.config.jax_compilation_cache_dir
    if not base:
        return None
    path = os.path.join(base, "jaxmm")
    os.makedirs(path, exist_ok=True)
    return path


@functools.cache
def source_digest() -> str:
    """sha256 of every .py file of the installed jaxmm package (any edit changes every key)."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(_JAXMM_DIR):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                h.update(os.path.relpath(path, _JAXMM_DIR).encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def environment_key() -> dict:
    """What, besides the caller's own inputs, decides a compiled program on this machine."""
    import jax
    import jaxlib

    devices = jax.devices()
    flags = {k: v for k, v in os.environ.items() if k.startswith(("JAXMM_", "XLA_", "JAX_"))}
    flags.pop("JAXMM_CACHE_DIR", None)
    return {
        "jaxmm_source": source_digest(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "platform": jax.default_backend(),
        "platform_version": devices[0].client.platform_version,
        "device_kind": devices[0].device_kind,
        "num_devices": len(devices),
        "x64": bool(jax.config.jax_enable_x64),
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        "env": sorted(flags.items()),
    }


def key_of(*parts) -> str:
    """A file-name-safe digest of the environment and `parts` (anything `repr` describes)."""
    h = hashlib.sha256(json.dumps(environment_key(), sort_keys=True, default=str).encode())
    for p in parts:
        h.update(b"\0")
        h.update(repr(p).encode())
    return h.hexdigest()[:40]


def read(kind: str, key: str) -> bytes | None:
    d = cache_dir()
    if d is None:
        return None
    try:
        with open(os.path.join(d, f"{kind}-{key}"), "rb") as f:
            return f.read()
    except OSError:
        return None


def write(kind: str, key: str, data: bytes) -> None:
    d = cache_dir()
    if d is None:
        return
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(d, f"{kind}-{key}"))
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def forget(kind: str, key: str) -> None:
    d = cache_dir()
    if d is not None:
        try:
            os.unlink(os.path.join(d, f"{kind}-{key}"))
        except OSError:
            pass
