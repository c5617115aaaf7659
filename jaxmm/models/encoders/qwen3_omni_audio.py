"""Qwen3-Omni's audio tower (transformers' `Qwen3OmniMoeAudioEncoder`), HF names.

1. An item's valid log-mel frames (mel, L) are cut into chunks of `2 * n_window` frames (the
   last one shorter). Each chunk goes through three Conv2d(3, stride 2, padding 1) + GELU
   over (mel, time) on its own, then `conv_out` flattens (channels, mel) per time step to
   D, and sinusoid positions restart at 0 in every chunk. A chunk of c frames leaves
   `conv_rows(c)` rows.
2. The rows of the chunks, back to back, attend within windows of
   `conv_rows(longest chunk) * n_window_infer / (2 * n_window)` rows (the last one
   shorter): full chunks group by `n_window_infer` frames.
3. `ln_post`, `proj1`, GELU, `proj2` to the text width; no pooling.

transformers pads every chunk of a call with zeros to the call's longest chunk and does not
mask the convolutions, so a short last chunk's edge rows see GELU(bias) where a shorter pad
would give zeros. jaxmm computes each item as transformers computes it alone: its chunks
padded to `min(L, 2 * n_window)` frames (`pad_to`), the positions past that zeroed after
every conv as the zero padding of a shorter input would be, whatever else shares the call.

Shape letters: N chunks, M mel bins, W chunk frames, C conv channels, R rows, B attention
windows, L rows a window, D width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmm.layers.linear import Linear
from jaxmm.layers.mlp import activation
from jaxmm.models.encoders.clip import LayerNorm
from jaxmm.models.qwen2_5_omni import sinusoids
from jaxmm.models.whisper import WhisperEncoderLayer, next_pow2


def conv_len(n):
    """Length after one Conv(3, stride 2, padding 1) of a length-n axis."""
    return (n - 1) // 2 + 1


def conv_rows(frames):
    """Rows a chunk of `frames` mel frames leaves after the three convs."""
    return conv_len(conv_len(conv_len(frames)))


class Conv2d(nnx.Module):
    """torch.nn.Conv2d(k=3, stride 2, padding 1) with HF names: `weight` (out, in, 3, 3)."""

    def __init__(self, din: int, dout: int, *, dtype):
        self.weight = nnx.Param(jnp.zeros((dout, din, 3, 3), dtype=dtype))
        self.bias = nnx.Param(jnp.zeros((dout,), dtype=dtype))

    def __call__(self, x: jax.Array) -> jax.Array:  # (N, in, M, W) -> (N, out, M/2, W/2)
        w = self.weight[...]
        y = jax.lax.conv_general_dilated(
            x.astype(w.dtype),
            w,
            window_strides=(2, 2),
            padding=[(1, 1), (1, 1)],
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
            precision=jax.lax.Precision.HIGHEST,
        )
        return y + self.bias[...][None, :, None, None]


class Qwen3OmniMoeAudioEncoder(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        D, C, M = config.d_model, config.downsample_hidden_size, config.num_mel_bins
        self.conv2d1 = Conv2d(1, C, dtype=dtype)
        self.conv2d2 = Conv2d(C, C, dtype=dtype)
        self.conv2d3 = Conv2d(C, C, dtype=dtype)
        self.conv_out = Linear(C * conv_rows(M), D, bias=False, dtype=dtype, rngs=rngs)
        self.layers = nnx.List(
            [
                WhisperEncoderLayer(config, dtype=dtype, rngs=rngs)
                for _ in range(config.encoder_layers)
            ]
        )
        self.ln_post = LayerNorm(D, dtype=dtype)
        self.proj1 = Linear(D, D, bias=True, dtype=dtype, rngs=rngs)
        self.proj2 = Linear(D, config.output_dim, bias=True, dtype=dtype, rngs=rngs)
        self.act = config.activation_function
        rows = conv_rows(2 * int(config.n_window))
        self.positions = tuple(map(tuple, sinusoids(rows, D).tolist()))

    def __call__(self, chunks, pad_to, rows, valid, order) -> jax.Array:
        """chunks (N, M, W) zero past each chunk's frames; pad_to (N,) frames each chunk is
        padded to (its item's); rows (B, L) flat indices into (N * W/8) of each attention
        window's rows, valid (B, L) which are real; order (R,) flat indices into (B * L) of
        the rows in item order -> (R, D_out)."""
        gelu = activation("gelu")
        x = chunks[:, None].astype(self.conv2d1.weight.dtype)  # (N, 1, M, W)
        length = pad_to
        for conv in (self.conv2d1, self.conv2d2, self.conv2d3):
            x = gelu(conv(x))
            length = conv_len(length)
            # past the item's padded length there is no input: zeros, as conv padding sees
            keep = jnp.arange(x.shape[-1])[None, :] < length[:, None]  # (N, W')
            x = x * keep[:, None, None, :].astype(x.dtype)
        N, C, F, T = x.shape
        x = self.conv_out(x.transpose(0, 3, 1, 2).reshape(N, T, C * F))  # (N, T, D)
        x = x + jnp.asarray(np.array(self.positions, np.float32), x.dtype)[None, :T]
        x = x.reshape(N * T, -1)[rows]  # (B, L, D): one attention window a row
        bias = jnp.where(valid, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        x = x.reshape(-1, x.shape[-1])[order]  # (R, D), items back to back
        x = self.proj1(self.ln_post(x))
        return self.proj2(activation(self.act)(x))


def pack_audio(items: list[np.ndarray], n_window: int, n_window_infer: int) -> dict:
    """Items' valid log-mel frames [(M, L)] -> one call's host inputs and each item's row
    count. Chunks, windows and rows are padded to powers of two; a window holds at most
    `conv_rows(2 * n_window) * n_window_infer / (2 * n_window)` rows (L), so attention costs
    R * L, not R^2. Padding chunks take one frame and no rows; padding window slots read
    row 0, masked.
    """
    size = 2 * n_window
    ratio = n_window_infer // size
    T = conv_rows(size)
    L = T * ratio  # the longest window
    chunks, pad_to, windows, counts = [], [], [], []
    n_chunks = 0
    for feats in items:
        M, frames = feats.shape
        n = max(1, -(-frames // size))
        item_pad = min(frames, size)
        rows = []
        for i in range(n):
            part = feats[:, i * size : (i + 1) * size]
            c = np.zeros((M, size), np.float32)
            c[:, : part.shape[1]] = part
            chunks.append(c)
            pad_to.append(item_pad)
            rows.append((n_chunks + i) * T + np.arange(conv_rows(part.shape[1])))
        rows = np.concatenate(rows)
        window = conv_rows(item_pad) * ratio  # transformers' window for this item alone
        windows += [rows[i : i + window] for i in range(0, len(rows), window)]
        counts.append(len(rows))
        n_chunks += n
    N, B, R = next_pow2(n_chunks), next_pow2(len(windows)), next_pow2(sum(counts))
    out_chunks = np.zeros((N, items[0].shape[0], size), np.float32)
    out_chunks[:n_chunks] = np.stack(chunks)
    out_pad = np.ones(N, np.int32)
    out_pad[:n_chunks] = pad_to
    src = np.zeros((B, L), np.int32)
    valid = np.zeros((B, L), bool)
    order = np.zeros(R, np.int32)
    k = 0
    for b, w in enumerate(windows):
        src[b, : len(w)] = w
        valid[b, : len(w)] = True
        order[k : k + len(w)] = b * L + np.arange(len(w))
        k += len(w)
    return dict(
        chunks=out_chunks, pad_to=out_pad, rows=src, valid=valid, order=order, counts=counts
    )
