"""Keep other libraries' start-up notices that are not the user's business off the screen.

Installed when `jaxmm` is imported (before transformers or JAX are), as logging filters on
those libraries' loggers: nothing is changed for the user's own use of them beyond the
records named here, and every warning about the user's setup still shows.

- transformers: "PyTorch was not found. Models won't be available ..." (jaxmm runs its
  models in JAX; it uses transformers for configs and tokenizers only).
- JAX: "Unable to initialize backend 'tpu': ... Failed to open libtpu.so: ... cannot open
  shared object file": libtpu is simply not installed (every CPU or GPU machine). A TPU
  runtime that is installed and fails to start, and any GPU backend's failure (a missing
  driver included), are still reported, as is JAX's warning when it falls back to the CPU.
"""

from __future__ import annotations

import logging
import re

# libtpu is not installed: nothing to act on (the TPU runtime's own failures say otherwise)
_NO_LIBTPU = re.compile(r"^Unable to initialize backend 'tpu': .*libtpu\S*: cannot open shared")


class _DropTorchNotFound(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("PyTorch was not found")


class _DropAbsentBackends(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
        return not _NO_LIBTPU.search(record.getMessage())


_installed = False


def install() -> None:
    """Add the filters (once)."""
    global _installed
    if _installed:
        return
    _installed = True
    logging.getLogger("transformers").addFilter(_DropTorchNotFound())
    logging.getLogger("jax._src.xla_bridge").addFilter(_DropAbsentBackends())
