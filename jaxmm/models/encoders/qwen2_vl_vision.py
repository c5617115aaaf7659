"""Qwen2-VL / Qwen2.5-VL vision transformers, HF names, one packed batch per call.

Images and videos arrive as flattened patches (n, C*tp*p*p) with their grid (t, h, w), or
(images through `fast_image.py`) as their raw uint8 pixels that `patch_pixels` cuts into
patches and maps through their byte table on the device: the float32 values HF's processor
would have sent.
Several items are packed into one sequence of N patches and attention is confined to
segments: a patch attends to patches of its own frame (Qwen2-VL, and Qwen2.5-VL's full
attention blocks) or of its own window (Qwen2.5-VL's other blocks). Segments are
contiguous runs of the packed sequence.

Attention (`packed_attention`): per layer, q/k/v are gathered from the packed order into
a padded batch (B segments, C slots) with each segment's length, run through
`jax.nn.dot_product_attention` (cuDNN flash attention on GPU in bf16/fp16, so no
(C, C) score matrix is ever stored; XLA elsewhere, in query blocks once the scores
would pass `SCORE_BUDGET`), and gathered back. The (B, C) <-> N index arrays are built
on the host by `pack` (numpy) and passed in as inputs, so one compiled program serves
every batch of the same bucket shapes. `segment_attention` is the dense masked oracle.

Buckets (the shapes one compiled program serves; `ladder` rounds up with 8 steps per
octave, i.e. to a multiple of 2^(k-3) for 2^k <= n, so at most 12.5% padding where a
power of two pads up to 100% (9216 patches of a 1344^2 image: 9216, not 16384)):
  N  patches        ladder(N), multiples of 64 (the merger needs multiples of m^2)
  full attention    B = next power of two of the frame count, C = ladder(longest frame)
                    (one image: (1, N bucket); a video of t equal frames: (pow2(t), ...))
  window attention  C = window^2 * m^2 patches (a full window), B = ladder(windows, 8)
One image size thus compiles one program, and nearby sizes share it. The caller packs
items into one call only while the padded layouts stay within a slot budget
(`layout_slots`), so a big frame next to many small ones never pads them all to its size.

Qwen2-VL: LayerNorm, fc1/fc2 MLP, 2D rotary over (h, w) patch coordinates, then a patch
merger (LayerNorm + MLP over 2x2 neighbourhoods). Qwen2.5-VL: RMSNorm, gated SiLU MLP with
biases, the same merger with RMSNorm, and window attention: patches are reordered window by
window on the host (`pack`), which changes no math (attention is confined to segments, all
other ops are per patch), and the merged rows are put back in order afterwards.
Shape letters: N patches (packed), D width, Hn heads, Hd head dim, K patch pixels,
B segments and C slots per segment in the padded attention batch.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmm.layers.linear import ROW, Linear
from jaxmm.layers.mlp import GatedMLP, activation
from jaxmm.layers.norm import RMSNorm
from jaxmm.layers.rope import rotate_half
from jaxmm.models.encoders.clip import ConvWeight, LayerNorm
from jaxmm.multimodal.fast_image import gather_index

log = logging.getLogger(__name__)

MIN_PATCH_BUCKET = 64
QUERY_BLOCK = 512  # the dense oracle processes this many query patches at a time
SCORE_BUDGET = 1 << 26  # XLA path: score floats per query block (256 MB in float32)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def ladder(n: int, min_step: int = 1) -> int:
    """n rounded up to a multiple of max(min_step, 2^(k-3)), 2^k <= n: 8 steps per octave."""
    n = max(int(n), 1)
    step = max(int(min_step), 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


class Segments(NamedTuple):
    """Where each segment (frame or window) sits in the padded (B, C) attention batch."""

    index: jax.Array  # (B, C) int32: the packed patch in each slot (0 in padding slots)
    lens: jax.Array  # (B,) int32: real patches per segment (0 for padding segments)
    slot: jax.Array  # (N,) int32: each patch's flat slot b * C + c (0 for padding patches)


class PatchEmbed(nnx.Module):
    def __init__(self, vc, dim: int, *, dtype):
        shape = (dim, vc.in_channels, vc.temporal_patch_size, vc.patch_size, vc.patch_size)
        self.proj = ConvWeight(shape, dtype)  # Conv3d, stride == kernel: a matmul per patch

    def __call__(self, x: jax.Array) -> jax.Array:  # (N, K) -> (N, D)
        w = self.proj.weight[...]
        return jnp.einsum("NK,DK->ND", x.astype(w.dtype), w.reshape(w.shape[0], -1))


def patch_pixels(
    data: jax.Array, sources: jax.Array, table: jax.Array, temporal_patch_size: int
) -> jax.Array:
    """The images' raw bytes (N, C, P) uint8 (`fast_image.PatchBytes`: (h, w, C) pixels back
    to back) -> pixel values (N, C*tp*P) float32: each patch gathered from where `sources`
    (N, 2) says it starts (`fast_image.gather_index`, HF's patch order), then expanded."""
    N, C, P = data.shape
    patches = data.reshape(-1)[gather_index(sources, C, P, xp=jnp)]
    return expand_patch_bytes(patches, table, temporal_patch_size)


def expand_patch_bytes(data: jax.Array, table: jax.Array, temporal_patch_size: int) -> jax.Array:
    """uint8 patches (N, C, P) -> pixel values (N, C*tp*P) float32, columns (C, tp, P).

    `fast_image.py`'s step 4 on the device: a gather from the (C, 256) float32 byte table
    (an input of the program, not a constant of it) and a broadcast over the temporal patch.
    No arithmetic touches the values, so they are the table's: bitwise HF's `pixel_values`.
    """
    N, C, P = data.shape
    values = table[jnp.arange(C)[:, None], data]  # (N, C, P)
    values = jnp.broadcast_to(values[:, :, None], (N, C, temporal_patch_size, P))
    return values.reshape(N, C * temporal_patch_size * P)


class VisionAttention(nnx.Module):
    def __init__(self, dim: int, num_heads: int, *, dtype, rngs):
        self.Hn, self.Hd = num_heads, dim // num_heads
        self.qkv = Linear(dim, 3 * dim, bias=True, dtype=dtype, rngs=rngs)
        self.proj = Linear(dim, dim, bias=True, dtype=dtype, shard=ROW, rngs=rngs)

    def __call__(self, x, cos, sin, segs: Segments, implementation: str = "xla"):
        N = x.shape[0]
        qkv = self.qkv(x).reshape(N, 3, self.Hn, self.Hd)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (N, Hn, Hd)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = packed_attention(q, k, v, segs, self.Hd**-0.5, implementation)
        return self.proj(out.reshape(N, self.Hn * self.Hd))


def packed_attention(q, k, v, segs: Segments, scale: float, implementation: str = "xla"):
    """Attention within segments: q/k/v (N, Hn, Hd) -> (N, Hn, Hd).

    Gathers the segments into a padded (B, C, Hn, Hd) batch, attends with per-segment
    lengths and gathers the rows back. implementation: "cudnn" (flash attention, GPU,
    bf16/fp16; see `attention_implementation`) or "xla". Either way the scores and softmax
    are float32 with model-dtype operands, probabilities cast back to the model's dtype
    before the PV product, as HF's eager attention does.
    """
    N, Hn, Hd = q.shape
    B, C = segs.index.shape
    # one segment as long as the bucket (one image): slot c holds patch c, no gathers
    # (padding slots and padding patches are never read back, whichever they pair with)
    identity = (B, C) == (1, N)
    if identity:
        qs, ks, vs = q[None], k[None], v[None]
    else:
        qs, ks, vs = q[segs.index], k[segs.index], v[segs.index]  # (B, C, Hn, Hd)
    if implementation == "cudnn":
        out = jax.nn.dot_product_attention(
            qs,
            ks,
            vs,
            scale=scale,
            query_seq_lengths=segs.lens,
            key_value_seq_lengths=segs.lens,
            implementation="cudnn",
        )
    elif implementation == "xla":
        out = _xla_attention(qs, ks, vs, segs.lens, scale)
    else:
        raise ValueError(f"unknown vision attention implementation {implementation!r}")
    return out[0] if identity else out.reshape(B * C, Hn, Hd)[segs.slot]


def _xla_attention(q, k, v, lens, scale: float, budget: int = SCORE_BUDGET):
    """(B, C, Hn, Hd) -> (B, C, Hn, Hd) with keys masked past `lens`, in query blocks.

    XLA stores the (B, Hn, Cq, C) scores of a block of Cq queries: halve Cq until they fit
    `budget` (one 16k-patch frame at once would take 16 GB in float32). Padding queries
    attend to their segment's keys (finite, and never read back).
    """
    B, C, Hn, Hd = q.shape
    Cq = C
    while B * Hn * Cq * C > budget and Cq % 2 == 0 and Cq > 16:
        Cq //= 2

    def one(qc):  # (B, Cq, Hn, Hd)
        return jax.nn.dot_product_attention(
            qc, k, v, scale=scale, key_value_seq_lengths=lens, implementation="xla"
        )

    if Cq == C:
        return one(q)
    blocks = q.reshape(B, C // Cq, Cq, Hn, Hd).swapaxes(0, 1)
    return jax.lax.map(one, blocks).swapaxes(0, 1).reshape(B, C, Hn, Hd)


def attention_implementation(dtype, head_dim: int) -> str:
    """The attention path here: cuDNN on a GPU for bf16/fp16 if a probe lowers and matches."""
    if jax.default_backend() != "gpu" or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return "xla"
    return "cudnn" if _cudnn_works(jnp.dtype(dtype).name, int(head_dim)) else "xla"


@functools.cache
def _cudnn_works(dtype_name: str, head_dim: int) -> bool:
    """Compile and check cuDNN flash attention once per (dtype, head dim) and process."""
    try:
        rng = np.random.default_rng(0)
        B, C, Hn = 2, 40, 2
        q, k, v = (
            jnp.asarray(rng.standard_normal((B, C, Hn, head_dim)), dtype_name) for _ in range(3)
        )
        lens = jnp.array([C, 17], jnp.int32)
        got = jax.jit(
            functools.partial(
                jax.nn.dot_product_attention,
                query_seq_lengths=lens,
                key_value_seq_lengths=lens,
                implementation="cudnn",
            )
        )(q, k, v)
        want = _xla_attention(q, k, v, lens, head_dim**-0.5)
        rows = np.arange(C)[None, :] < np.asarray(lens)[:, None]  # padding rows are unread
        diff = jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))
        err = float(jnp.max(jnp.where(rows[:, :, None, None], diff, 0.0)))
        if not err < 5e-2:
            log.warning("cuDNN vision attention probe mismatch (max err %g): using XLA", err)
            return False
        return True
    except Exception as e:  # no cuDNN, or this shape / dtype is unsupported
        log.warning("cuDNN vision attention unavailable (%s): using XLA", e)
        return False


def segment_attention(q, k, v, seg, scale: float, block: int = QUERY_BLOCK):
    """The dense oracle: q/k/v (N, Hn, Hd), segment ids seg (N,) -> (N, Hn, Hd).

    Every query scores every patch and masks other segments ((Hn, block, N) floats per
    block of queries): what `packed_attention` must match, for tests.
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

    def __call__(self, x, cos, sin, segs: Segments, implementation: str = "xla"):
        x = x + self.attn(self.norm1(x), cos, sin, segs, implementation)
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

    def __call__(
        self,
        pixels,
        pos,
        full: Segments,
        window: Segments | None = None,
        order=None,
        implementation: str = "xla",
    ):
        """pixels (N, K), pos (N, 2) int (h, w), segment layouts -> merged (N / m^2, D_out).

        full: one segment per frame; window: one per window and order (N,) int32, the row of
        `pixels` at each packed position (Qwen2.5-VL; None otherwise). implementation:
        "xla" or "cudnn" (`attention_implementation`), fixed per compiled program.
        """
        if order is not None:
            pixels = pixels[order]  # window by window
        x = self.patch_embed(pixels)
        inv = jnp.asarray(np.array(self.inv_freq, np.float32))
        freqs = pos.astype(jnp.float32)[:, :, None] * inv  # (N, 2, Hd/4): h then w
        freqs = freqs.reshape(freqs.shape[0], -1)
        emb = jnp.concatenate([freqs, freqs], axis=-1)  # (N, Hd)
        cos, sin = jnp.cos(emb), jnp.sin(emb)
        for i, block in enumerate(self.blocks):
            use_full = not self.windowed or i in self.full_blocks
            x = block(x, cos, sin, full if use_full else window, implementation)
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
# Host-side packing (numpy): positions, window order, segment layouts, padding to a bucket


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


def segments(lengths, num_segments: int, max_len: int, num_patches: int) -> Segments:
    """Contiguous runs of `lengths` patches -> their padded (num_segments, max_len) layout."""
    lengths = np.asarray(lengths, np.int64)
    total = int(lengths.sum())
    if len(lengths) > num_segments or lengths.max() > max_len or total > num_patches:
        raise ValueError(
            f"{len(lengths)} segments up to {lengths.max()} patches do not fit "
            f"({num_segments}, {max_len}) / {num_patches} patches"
        )
    starts = np.cumsum(lengths) - lengths
    c = np.arange(max_len)
    index = np.zeros((num_segments, max_len), np.int32)
    index[: len(lengths)] = np.where(c < lengths[:, None], starts[:, None] + c, 0)
    lens = np.zeros(num_segments, np.int32)
    lens[: len(lengths)] = lengths
    seg = np.repeat(np.arange(len(lengths)), lengths)
    slot = np.zeros(num_patches, np.int32)
    slot[:total] = seg * max_len + np.arange(total) - starts[seg]
    return Segments(index, lens, slot)


def _window_side(vc, windowed: bool) -> int:
    """Window side in merged units (HF: window_size // m // patch_size); 0: no windows."""
    return vc.window_size // vc.spatial_merge_size // vc.patch_size if windowed else 0


def _layout_shapes(grids, m: int, window: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(B, C) of the full-attention and window layouts for items of these (t, h, w)."""
    frames = sum(t for t, _, _ in grids)
    full = (next_pow2(frames), ladder(max(h * w for _, h, w in grids), MIN_PATCH_BUCKET))
    if not window:
        return full, (0, 0)
    count = sum(t * -(-(h // m) // window) * -(-(w // m) // window) for t, h, w in grids)
    return full, (ladder(count, 8), window * window * m * m)


def layout_slots(grids, vc, windowed: bool) -> int:
    """Padded rows one encoder call on these (t, h, w) items gathers for attention.

    The caller keeps this under its per-call budget: frames of very different sizes in one
    call would otherwise all be padded to the longest.
    """
    (B, C), (Bw, Cw) = _layout_shapes(grids, vc.spatial_merge_size, _window_side(vc, windowed))
    return max(B * C, Bw * Cw)


def pack(items: list[tuple[np.ndarray, tuple]], vc, windowed: bool) -> dict:
    """Pack items [(pixels (n, ...), (t, h, w))] into one padded batch for the tower.

    pixels: (n, K) float32 values or (n, C, p*p) uint8 patch bytes, one kind per batch.
    They stay in item order and are copied at most once, into the padded buffer (not at all
    for one item that fills its bucket, as 448^2 and 1344^2 images do): a 1344^2 image is
    43 MB of float32 (5.4 MB of bytes) and each host copy of it took ~15 ms on an H100 host.
    Qwen2.5-VL's window-by-window order is applied on device instead, through `order`, and
    undone there on the merged rows, through `unpermute`.
    """
    m = vc.spatial_merge_size
    unit = m * m
    window = _window_side(vc, windowed)
    pos, frames, win_lens, order = [], [], [], []
    unit_base = 0
    for _, (t, h, w) in items:
        pos.append(patch_positions(t, h, w, m))
        frames += [h * w] * t
        units = t * (h // m) * (w // m)
        if windowed:
            idx, wid = window_order(t, h, w, m, window)
            order.append(idx + unit_base)
            win_lens.append(np.bincount(wid) * unit)  # ids ascend: windows in packed order
        else:
            order.append(np.arange(units) + unit_base)
        unit_base += units
    units = np.concatenate(order)
    perm = (units[:, None] * unit + np.arange(unit)).reshape(-1)  # patches, window by window
    N = len(perm)
    Nb = ladder(N, MIN_PATCH_BUCKET)
    first = np.asarray(items[0][0])
    if len(items) == 1 and N == Nb:
        pixels = first
    else:
        pixels = np.zeros((Nb,) + first.shape[1:], first.dtype)
        np.concatenate([px for px, _ in items], out=pixels[:N])
    padded_pos = np.zeros((Nb, 2), np.int32)
    padded_pos[:N] = np.concatenate(pos)[perm]
    (B, C), (Bw, Cw) = _layout_shapes([g for _, g in items], m, window)
    unpermute = None
    if windowed:  # merged rows back in item order (the padding rows stay last)
        tail = np.arange(len(units), Nb // unit)
        unpermute = np.concatenate([np.argsort(units, kind="stable"), tail]).astype(np.int32)
    return {
        "pixels": pixels,  # (Nb, ...), item order
        # packed patch -> row of `pixels` (None: the same order)
        "order": np.concatenate([perm, np.arange(N, Nb)]).astype(np.int32) if windowed else None,
        "pos": padded_pos,  # (Nb, 2) (row, col) of each packed patch
        "full": segments(frames, B, C, Nb),  # a frame's patches stay contiguous
        "window": segments(np.concatenate(win_lens), Bw, Cw, Nb) if windowed else None,
        "unpermute": unpermute,  # (Nb / m^2,) merged row -> its row in item order (None: same)
    }
