"""Encoder features that stay on the device: rows of a device array, as a lazy view.

An encoder call leaves its items' features in one bucket-shaped device array, and the
runner copies each item's rows into its encoder cache by row index (`ModelRunner.encode`):
no trip through the host. Slicing a `jax.Array` with Python ints would compile a program
per slice length (JAX 0.10.2: one compile per new length, none per new offset), so an item's
features are a `DeviceRows` view (array, start, stop); only bucket shapes ever reach a
compiled program.
"""

from __future__ import annotations

import jax
import numpy as np


class DeviceRows:
    """Rows [start, stop) of a device array (M, D); its slices are views of the same array.

    It reads as an opaque (n, D) array: `len`, `.shape`, `.nbytes`, `e[a:b]`.
    """

    __slots__ = ("array", "start", "stop")

    def __init__(self, array: jax.Array, start: int = 0, stop: int | None = None):
        self.array = array
        self.start = start
        self.stop = len(array) if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.array.shape[1:])

    @property
    def dtype(self):
        return self.array.dtype

    @property
    def nbytes(self) -> int:
        """Device bytes this keeps alive: the whole array, padding rows included."""
        return int(self.array.nbytes)

    def __getitem__(self, index: slice) -> DeviceRows:
        rows = range(self.start, self.stop)[index]
        if not isinstance(rows, range) or rows.step != 1:
            raise TypeError(f"DeviceRows takes contiguous row slices, not {index!r}")
        return DeviceRows(self.array, rows.start, rows.stop)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The rows on the host (tests, debugging): the whole array comes over, then a slice."""
        return np.asarray(self.array, dtype)[self.start : self.stop]
