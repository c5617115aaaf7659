"""What a user sees while jaxmm loads and compiles: a bar over each long wait, and one line
per start-up phase with its time ("loaded weights in 2.3 s", "compiled 7 token buckets in
41.0 s", "engine ready in 47.9 s").

- Bars (tqdm, on stderr) show when stderr is a terminal. `JAXMM_PROGRESS=1` forces them on
  (a log collector that renders them), `JAXMM_PROGRESS=0` off; a CI log with no terminal
  gets no bar redraws.
- Phase lines go to the `jaxmm` logger at INFO, so `jaxmm serve` (which logs at INFO) and
  any application that configures logging show them once, in its format. When logging
  would not show them (a plain script calling `LLM()`), they are written to stderr directly
  while bars are on: a user at a terminal sees them either way.

Imports nothing of jaxmm, so any layer may use it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator

logger = logging.getLogger("jaxmm")

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


def enabled() -> bool:
    """Whether bars (and the phase lines logging would not show) go to stderr."""
    value = os.environ.get("JAXMM_PROGRESS", "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    stream = sys.stderr
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str):
    """A tqdm bar on stderr (a disabled one, which prints nothing, when bars are off). It is
    removed when done: the phase line that follows says what it did."""
    from tqdm.auto import tqdm

    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=not enabled(),
        leave=False,
        dynamic_ncols=True,
    )


def _logging_shows(level: int) -> bool:
    """Whether a record at `level` on the jaxmm logger reaches a handler that emits it."""
    if not logger.isEnabledFor(level):
        return False
    current: logging.Logger | None = logger
    while current is not None:
        if any(level >= h.level for h in current.handlers):
            return True
        if not current.propagate:
            return False
        current = current.parent
    return False  # only logging's last resort, which shows warnings and above


def note(msg: str, *args) -> None:
    """One phase line: logged at INFO, and on stderr when logging would not show it."""
    logger.info(msg, *args)
    if enabled() and not _logging_shows(logging.INFO):
        print(f"jaxmm: {msg % args if args else msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def phase(done: str) -> Iterator[None]:
    """Time the block and then note `done` with its time: `with phase("loaded weights"):`."""
    t0 = time.perf_counter()
    yield
    note("%s in %.1f s", done, time.perf_counter() - t0)


def lazy_compile_note(num_buckets: int) -> None:
    """Said when an engine starts without warmup: where the compile time goes instead."""
    note(
        "warmup is off: the first generate() compiles the programs for the batch shapes it "
        "meets (up to %d token buckets; seconds to minutes each on a CPU). Pass warmup=True "
        "to compile them all now, and compilation_cache_dir= to keep them across runs.",
        num_buckets,
    )
