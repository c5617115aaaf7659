"""Qwen2-VL / Qwen2.5-VL vision transformers, HF names, one packed batch per call.

Images and videos arrive as flattened patches (n, C*tp*p*p) with their grid (t, h, w).
Several items are packed into one sequence of N patches (padded to a power of two, so
new sizes reuse compiled programs) and attention is confined to each frame by segment
ids: a patch attends to patches of its own frame (Qwen2-VL, and Qwen2.5-VL's full
attention blocks) or of its own window (Qwen2.5-VL's other blocks).

Qwen2-VL: LayerNorm, fc1/fc2 MLP, 2D rotary over (h, w) patch coordinates, then a patch
merger (LayerNorm + MLP over 2x2 neighbourhoods). Qwen2.5-VL: RMSNorm, gated SiLU MLP with
biases, the same merger with RMSNorm, and window attention: patches are reordered window by
window on the host (`pack`), which changes no math (attention is masked by segment, all
other ops are per patch), and the merged rows are put back in order afterwards.
Shape letters: N patches (packed), D width, Hn heads, Hd head dim, K patch pixels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmm.layers.linear import ROW, Linear
from jaxmm.layers.mlp import GatedMLP, activation
from jaxmm.layers.norm import RMSNorm
from jaxmm.layers.rope import rotate_half
from jaxmm.models.encoders.clip import ConvWeight, LayerNorm

MIN_PATCH_BUCKET = 64
QUERY_BLOCK = 512  # encoder attention processes this many query patches at a time


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class PatchEmbed(nnx.Module):
    def __init__(self, vc, dim: int, *, dtype):
        shape = (dim, vc.in_channels, vc.temporal_patch_size, vc.patch_size, vc.patch_size)
        self.proj = ConvWeight(shape, dtype)  # Conv3d, stride == kernel: a matmul per patch

    def __call__(self, x: jax.Array) -> jax.Array:  # (N, K) -> (N, D)
        w = self.proj.weight[...]
        return jnp.einsum("NK,DK->ND", x.astype(w.dtype), w.reshape(w.shape[0], -1))


class VisionAttention(nnx.Module):
    def __init__(self, dim: int, num_heads: int, *, dtype, rngs):
        self.Hn, self.Hd = num_heads, dim // num_heads
        self.qkv = Linear(dim, 3 * dim, bias=True, dtype=dtype, rngs=rngs)
        self.proj = Linear(dim, dim, bias=True, dtype=dtype, shard=ROW, rngs=rngs)

    def __call__(self, x, cos, sin, seg):
        N = x.shape[0]
        qkv = self.qkv(x).reshape(N, 3, self.Hn, self.Hd)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (N, Hn, Hd)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = segment_attention(q, k, v, seg, self.Hd**-0.5)
        return self.proj(out.reshape(N, self.Hn * self.Hd))


def segment_attention(q, k, v, seg, scale: float, block: int = QUERY_BLOCK):
    """Attention within segments: q/k/v (N, Hn, Hd), seg (N,) -> (N, Hn, Hd).

    Queries go `block` at a time, so the scores never exceed (Hn, block, N) floats however
    many patches are packed (16k patches at once would need N^2 floats per head). Matmuls
    take the model's dtype with float32 accumulation (tensor cores for bf16: ~10x faster
    than float32 operands on an H100); softmax in float32 and probabilities cast back to
    the model's dtype before the PV product, as HF's eager attention does.
    """
    N, Hn, Hd = q.shape
    Bq = min(block, N)

    def one(chunk):
        qc, sc = chunk  # (Bq, Hn, Hd), (Bq,)
        s = jnp.einsum("qnh,knh->nqk", qc, k, preferred_element_type=jnp.float32) * scale
        s = jnp.where(sc[None, :, None] == seg[None, None, :], s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        out = jnp.einsum("nqk,knh->qnh", p, v, preferred_element_type=jnp.float32)
        return out.astype(q.dtype)

    out = jax.lax.map(one, (q.reshape(N // Bq, Bq, Hn, Hd), seg.reshape(N // Bq, Bq)))
    return out.reshape(N, Hn, Hd)


def _rotate(x, cos, sin):
    """Rotary in float32 (HF's apply_rotary_pos_emb_vision); cos/sin (N, Hd)."""
    x32 = x.astype(jnp.float32)
    out = x32 * cos[:, None, :] + rotate_half(x32) * sin[:, None, :]
    return out.astype(x.dtype)


class VisionMlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, act: str, *, dtype, rngs):
        self.fc1 = Linear(dim, hidden, bias=True, dtype=dtype, rngs=rngs)
        self.fc2 = Linear(hidden, dim, bias=True, dtype=dtype, shard=ROW, rngs=rngs)
        self.act = act

    def __call__(self, x):
        return self.fc2(activation(self.act)(self.fc1(x)))


class Qwen2VLVisionBlock(nnx.Module):
    def __init__(self, vc, *, dtype, rngs):
        dim = vc.embed_dim
        self.norm1 = LayerNorm(dim, 1e-6, dtype=dtype)
        self.norm2 = LayerNorm(dim, 1e-6, dtype=dtype)
        self.attn = VisionAttention(dim, vc.num_heads, dtype=dtype, rngs=rngs)
        self.mlp = VisionMlp(dim, int(dim * vc.mlp_ratio), vc.hidden_act, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, seg):
        x = x + self.attn(self.norm1(x), cos, sin, seg)
        return x + self.mlp(self.norm2(x))


class Qwen2_5_VLVisionBlock(Qwen2VLVisionBlock):
    def __init__(self, vc, *, dtype, rngs):
        dim = vc.hidden_size
        self.norm1 = RMSNorm(dim, 1e-6, dtype=dtype)
        self.norm2 = RMSNorm(dim, 1e-6, dtype=dtype)
        self.attn = VisionAttention(dim, vc.num_heads, dtype=dtype, rngs=rngs)
        self.mlp = GatedMLP(
            dim, vc.intermediate_size, vc.hidden_act, bias=True, dtype=dtype, rngs=rngs
        )


class _GELU(nnx.Module):
    """The parameterless middle of HF's `nn.Sequential(Linear, GELU, Linear)`."""

    def __call__(self, x):
        return jax.nn.gelu(x, approximate=False)


class PatchMerger(nnx.Module):
    """Concatenate each 2x2 (m x m) neighbourhood of patches and project to the LM width."""

    def __init__(self, out_dim: int, dim: int, merge: int, *, rms: bool, dtype, rngs):
        self.hidden = dim * merge * merge
        self.ln_q = RMSNorm(dim, 1e-6, dtype=dtype) if rms else LayerNorm(dim, 1e-6, dtype=dtype)
        self.mlp = nnx.List(
            [
                Linear(self.hidden, self.hidden, bias=True, dtype=dtype, rngs=rngs),
                _GELU(),
                Linear(self.hidden, out_dim, bias=True, dtype=dtype, rngs=rngs),
            ]
        )

    def __call__(self, x):  # (N, D) -> (N / m^2, out_dim)
        x = self.ln_q(x).reshape(-1, self.hidden)
        for layer in self.mlp:
            x = layer(x)
        return x


class Qwen2VisionTransformer(nnx.Module):
    block_cls = Qwen2VLVisionBlock
    windowed = False

    def __init__(self, vc, *, dtype=jnp.float32, rngs):
        self.config = vc
        dim = self.width(vc)
        self.patch_embed = PatchEmbed(vc, dim, dtype=dtype)
        self.blocks = nnx.List(
            [self.block_cls(vc, dtype=dtype, rngs=rngs) for _ in range(vc.depth)]
        )
        self.merger = PatchMerger(
            self.out_width(vc),
            dim,
            vc.spatial_merge_size,
            rms=self.windowed,
            dtype=dtype,
            rngs=rngs,
        )
        head_dim = dim // vc.num_heads
        theta = float((getattr(vc, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
        spatial = head_dim // 2
        inv = 1.0 / (
            theta ** (np.arange(0, spatial, 2, dtype=np.int64).astype(np.float32) / spatial)
        )
        self.inv_freq = tuple(float(f) for f in inv.astype(np.float32))
        self.full_blocks = tuple(getattr(vc, "fullatt_block_indexes", ()) or ())

    @staticmethod
    def width(vc) -> int:
        return vc.embed_dim

    @staticmethod
    def out_width(vc) -> int:
        return vc.hidden_size

    def __call__(self, pixels, pos, full_seg, window_seg):
        """pixels (N, K), pos (N, 2) int (h, w), segment ids (N,) -> merged (N / m^2, D_out)."""
        x = self.patch_embed(pixels)
        inv = jnp.asarray(np.array(self.inv_freq, np.float32))
        freqs = pos.astype(jnp.float32)[:, :, None] * inv  # (N, 2, Hd/4): h then w
        freqs = freqs.reshape(freqs.shape[0], -1)
        emb = jnp.concatenate([freqs, freqs], axis=-1)  # (N, Hd)
        cos, sin = jnp.cos(emb), jnp.sin(emb)
        for i, block in enumerate(self.blocks):
            full = not self.windowed or i in self.full_blocks
            x = block(x, cos, sin, full_seg if full else window_seg)
        return self.merger(x)


class Qwen2_5_VisionTransformer(Qwen2VisionTransformer):
    block_cls = Qwen2_5_VLVisionBlock
    windowed = True

    @staticmethod
    def width(vc) -> int:
        return vc.hidden_size

    @staticmethod
    def out_width(vc) -> int:
        return vc.out_hidden_size


# ---------------------------------------------------------------------------------------
# Host-side packing (numpy): positions, segments, window order, padding to a bucket


def patch_positions(t: int, h: int, w: int, m: int) -> np.ndarray:
    """(t*h*w, 2) (row, col) of each patch, in the processor's m x m block-major order."""
    rows = np.broadcast_to(np.arange(h)[:, None], (h, w))
    cols = np.broadcast_to(np.arange(w)[None, :], (h, w))
    rows = rows.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([rows, cols], axis=-1), (t, 1))


def window_order(t: int, h: int, w: int, m: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Merged units (t, h/m, w/m) in window-by-window order, and each one's window id.

    `window` is the window side in merged units (HF: window_size // m // patch_size).
    """
    lh, lw = h // m, w // m
    index = np.arange(t * lh * lw).reshape(t, lh, lw)
    ph, pw = -lh % window, -lw % window
    padded = np.full((t, lh + ph, lw + pw), -1, np.int64)
    padded[:, :lh, :lw] = index
    nh, nw = (lh + ph) // window, (lw + pw) // window
    windows = padded.reshape(t, nh, window, nw, window).transpose(0, 1, 3, 2, 4)
    windows = windows.reshape(t * nh * nw, window * window)
    win_id = np.broadcast_to(np.arange(len(windows))[:, None], windows.shape)
    keep = windows >= 0
    return windows[keep], win_id[keep]


def pack(items: list[tuple[np.ndarray, tuple]], vc, windowed: bool) -> dict:
    """Pack items [(pixels (n, K), (t, h, w))] into one padded batch for the tower."""
    m = vc.spatial_merge_size
    unit = m * m
    window = vc.window_size // m // vc.patch_size if windowed else 0
    pixels, pos, full, win, order = [], [], [], [], []
    unit_base = seg_base = win_base = 0
    for px, (t, h, w) in items:
        pixels.append(px)
        pos.append(patch_positions(t, h, w, m))
        full.append(np.repeat(np.arange(t) + seg_base, h * w))
        seg_base += t
        units = t * (h // m) * (w // m)
        if windowed:
            idx, wid = window_order(t, h, w, m, window)
            order.append(idx + unit_base)
            win.append(np.repeat(wid + win_base, unit))
            win_base += int(wid.max()) + 1
        else:
            order.append(np.arange(units) + unit_base)
        unit_base += units
    pixels = np.concatenate(pixels).astype(np.float32)
    pos = np.concatenate(pos)
    full = np.concatenate(full)
    units = np.concatenate(order)
    perm = (units[:, None] * unit + np.arange(unit)).reshape(-1)  # patches, window by window
    pixels, pos, full = pixels[perm], pos[perm], full[perm]
    win = np.concatenate(win) if windowed else full
    N = len(pixels)
    B = max(MIN_PATCH_BUCKET, next_pow2(N))

    def pad(a, value):
        out = np.full((B, *a.shape[1:]), value, a.dtype)
        out[:N] = a
        return out

    return {
        "pixels": pad(pixels, 0.0),
        "pos": pad(pos.astype(np.int32), 0),
        "full_seg": pad(full.astype(np.int32), -1),  # padding is its own segment
        "window_seg": pad(win.astype(np.int32), -1),
        "num_units": len(units),
        "unpermute": np.argsort(units, kind="stable"),  # merged rows back in item order
    }
