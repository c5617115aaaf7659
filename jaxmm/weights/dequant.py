"""Vectorized numpy dequantizers for the GGML block formats jaxmm reads from GGUF files.

A quantized GGML tensor is a sequence of fixed-size blocks along each row: `type_size` bytes
hold `block_size` values (for Q4_K: 144 bytes -> 256 values). Each kernel below takes the
blocks of a tensor as a `(B, type_size)` uint8 array and writes `(B, block_size)` float32 into
`out`. The arithmetic follows ggml's reference `dequantize_row_*` (ggml-quants.c) operation
by operation -- scales multiplied first, then applied to the integer codes -- so the results
are bitwise equal to `gguf.quants.dequantize`, which the tests check.

`dequantize` runs a kernel over a tensor in chunks of blocks, so temporaries stay in cache
and a large embedding never needs a second float32 copy.
"""

from collections.abc import Callable, Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QT = GGMLQuantizationType
SUPPORTED_TYPES = frozenset({QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q6_K})

_CHUNK_BLOCKS = 8192  # blocks per kernel call: ~1 MiB of float32 out, measured fastest on CPU


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 scale stored at byte `start` of every block, as float32 `(B, 1)`."""
    return blocks[:, start : start + 2].view(np.float16).astype(np.float32)


def _f32(blocks: np.ndarray, out: np.ndarray) -> None:
    out[:] = blocks.view(np.float32)


def _f16_values(blocks: np.ndarray, out: np.ndarray) -> None:
    out[:] = blocks.view(np.float16)


def _bf16(blocks: np.ndarray, out: np.ndarray) -> None:
    # bf16 is the top half of a float32
    out.view(np.uint32)[:] = blocks.view(np.uint16).astype(np.uint32) << 16


def _q8_0(blocks: np.ndarray, out: np.ndarray) -> None:
    # block: d (f16) | 32 x int8;  y = q * d
    np.multiply(blocks[:, 2:].view(np.int8), _f16(blocks, 0), out=out)


def _nibbles(qs: np.ndarray, out: np.ndarray) -> None:
    """Unpack 16 bytes into 32 codes: low nibbles are values 0..15, high nibbles 16..31."""
    half = qs.shape[-1]
    out[..., :half] = qs & 0x0F
    out[..., half:] = qs >> 4


def _q4_0(blocks: np.ndarray, out: np.ndarray) -> None:
    # block: d (f16) | 16 bytes of nibbles;  y = (q - 8) * d
    _nibbles(blocks[:, 2:], out)
    out -= 8
    out *= _f16(blocks, 0)


def _q4_1(blocks: np.ndarray, out: np.ndarray) -> None:
    # block: d (f16) | m (f16) | 16 bytes of nibbles;  y = q * d + m
    _nibbles(blocks[:, 4:], out)
    out *= _f16(blocks, 0)
    out += _f16(blocks, 2)


def _k4_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit (scale, min) pairs of a Q4_K block, packed in 12 bytes (ggml's
    get_scale_min_k4): bytes 0-3 / 4-7 hold the low 6 bits of scales / mins 0-3, bytes 8-11
    hold the low 4 bits of scales / mins 4-7, whose top 2 bits sit in the top of bytes 0-7."""
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    mins = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return scales, mins


def _q4_k(blocks: np.ndarray, out: np.ndarray) -> None:
    # block: d (f16) | dmin (f16) | 12 bytes of scales | 128 bytes of nibbles = 256 values in
    # 8 sub-blocks of 32; y = (d * scale) * q - (dmin * min)
    n = blocks.shape[0]
    scales, mins = _k4_scales(blocks[:, 4:16])
    d = _f16(blocks, 0) * scales.astype(np.float32)  # (B, 8)
    m = _f16(blocks, 2) * mins.astype(np.float32)
    qs = blocks[:, 16:].reshape(n, 4, 32)  # 32 bytes hold sub-blocks 2j (low) and 2j+1 (high)
    y = out.reshape(n, 4, 2, 32)
    y[:, :, 0] = qs & 0x0F
    y[:, :, 1] = qs >> 4
    y = out.reshape(n, 8, 32)
    y *= d[:, :, None]
    y -= m[:, :, None]


_Q6_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]


def _q6_k(blocks: np.ndarray, out: np.ndarray) -> None:
    # block: ql (128 bytes, low 4 bits) | qh (64 bytes, high 2 bits) | 16 int8 scales | d (f16)
    # = 256 values in two halves of 128; y = (d * scale) * (q - 32), one scale per 16 values.
    n = blocks.shape[0]
    ql = blocks[:, :128].reshape(n, 2, 64)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
    q = np.empty((n, 2, 128), dtype=np.uint8)
    q[:, :, :64] = ql & 0x0F  # values 0..63 of each half
    q[:, :, 64:] = ql >> 4  # values 64..127
    q |= ((qh >> _Q6_SHIFTS) & 0x03).reshape(n, 2, 128) << 4  # 2 bits per 32-value group
    d = _f16(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32)  # (B, 16)
    y = out.reshape(n, 16, 16)
    np.subtract(q.view(np.int8).reshape(n, 16, 16), np.int8(32), out=y)
    y *= d[:, :, None]


_KERNELS: dict[GGMLQuantizationType, Callable[[np.ndarray, np.ndarray], None]] = {
    QT.F32: _f32,
    QT.F16: _f16_values,
    QT.BF16: _bf16,
    QT.Q8_0: _q8_0,
    QT.Q4_0: _q4_0,
    QT.Q4_1: _q4_1,
    QT.Q4_K: _q4_k,
    QT.Q6_K: _q6_k,
}
assert set(_KERNELS) == SUPPORTED_TYPES


def supported_names() -> str:
    return ", ".join(sorted(t.name for t in SUPPORTED_TYPES))


def dequantize(
    data: np.ndarray, qtype: GGMLQuantizationType, shape: Sequence[int] | None = None
) -> np.ndarray:
    """Decode GGML-encoded `data` into a new float32 array.

    `data` is the raw bytes (uint8) of the tensor, or the typed array `gguf.GGUFReader` gives
    (float32/float16 for F32/F16, uint8 rows of blocks otherwise). `shape` is the numpy shape of
    the result (GGUF's `ne` reversed: `(out, in)` for a weight); without it, the result keeps
    `data`'s leading dims and the last dim becomes the number of values.
    """
    qtype = GGMLQuantizationType(qtype)
    if qtype not in SUPPORTED_TYPES:
        raise ValueError(
            f"GGML quantization type {qtype.name} is not supported by jaxmm; "
            f"supported: {supported_names()}"
        )
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    data = np.asarray(data)
    if shape is None:
        if data.dtype == np.uint8:
            if data.ndim == 0 or data.shape[-1] % type_size:
                raise ValueError(
                    f"{qtype.name}: rows of {data.shape[-1:]} bytes are not whole blocks"
                )
            shape = (*data.shape[:-1], data.shape[-1] // type_size * block_size)
        else:
            shape = data.shape
    shape = tuple(int(s) for s in shape)
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    n_values = int(np.prod(shape))
    if n_values % block_size or raw.size != n_values // block_size * type_size:
        raise ValueError(
            f"{qtype.name}: {raw.size} bytes do not hold a tensor of shape {shape} "
            f"(blocks of {block_size} values in {type_size} bytes)"
        )
    blocks = raw.reshape(-1, type_size)
    out = np.empty((blocks.shape[0], block_size), dtype=np.float32)
    kernel = _KERNELS[qtype]
    step = max(_CHUNK_BLOCKS * 32 // block_size, 1)  # about the same bytes per chunk for all types
    for start in range(0, blocks.shape[0], step):
        kernel(blocks[start : start + step], out[start : start + step])
    return out.reshape(shape)
