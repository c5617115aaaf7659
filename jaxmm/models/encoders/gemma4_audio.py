"""Gemma 4 audio tower (a USM-style conformer) and its embedder, HF names.

Log-mel features (B, Cm, M) (Cm mel frames of 10 ms, M mel bins) with the mask of real
frames -> `subsample_conv_projection`: two 3x3 stride-2 Conv2d + LayerNorm + ReLU over
(time, mel), each zeroing padded frames first, then one matmul to the width D: C = Cm / 4
frames of 40 ms -> conformer layers -> `output_proj` -> (B, C, Do). The Gemma 4 model puts
those rows through `Gemma4MultimodalEmbedder` (RMSNorm without scale, one matmul into the
text width) and splices them over the audio placeholders, one row per real frame.

A conformer layer (`Gemma4AudioLayer`) is: half-step feed-forward -> chunked local
self-attention -> light (depthwise, causal) convolution -> half-step feed-forward -> RMSNorm,
every sub-block between clamps (`gradient_clipping`) and RMSNorms (Gemma 4's norms scale by
w, not 1 + w). Linear layers of the tower are "clippable": the checkpoint carries bounds
their input and output are clamped to (`input_min` ... `output_max`, infinite when unset).

Attention is local (Transformer-XL style): the frames are cut in blocks of W =
`attention_chunk_size`; each block's queries see a context of X = W + past + future keys
(past = `attention_context_left` - 1, future = `attention_context_right`), keys farther
back than past - 1 frames, ahead by more than future - 1, or padded are masked (HF's
sliding-window mask, filled with `attention_invalid_logits_value`, not -inf). Logits add a
relative-position term (queries x projected sinusoids of R = X // 2 + 1 distances, moved
into place by the Transformer-XL shift) and are soft-capped. Queries are scaled per
dimension by softplus(`per_dim_scale`), keys by a constant.

Padding never reaches a real frame: the subsampling convs zero padded frames before each
conv, attention masks padded keys and the light conv only looks back. So an item's rows do
not depend on how far it is padded, which lets the encoder stage pad items to a few bucket
lengths (`encode_audio_items`).

Shape letters (beyond docs/shapes.md): Cm mel frames, M mel bins, U attention blocks,
W block size, X context per block, R relative distances, Do output width.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmm.layers.linear import Linear
from jaxmm.layers.mlp import activation
from jaxmm.models.device_rows import DeviceRows
from jaxmm.models.encoders.gemma4_vision import Gemma4RMSNorm  # the one Gemma 4 norm

MAX_AUDIOS_PER_CALL = 8  # encoder batch; smaller batches are padded to a power of two
MIN_FRAME_BUCKET = 128  # mel frames (1.28 s): shorter clips share one program


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def subsampled_length(num_frames):
    """Mel frames -> frames after the two stride-2 convs (kernel 3, padding 1)."""
    for _ in range(2):
        num_frames = (num_frames - 1) // 2 + 1
    return num_frames


def audio_num_tokens(frame_mask) -> int:
    """Audio soft tokens of one item: its real mel frames after subsampling (HF's
    processor counts `input_features_mask[::2][::2]`)."""
    mask = np.asarray(frame_mask).astype(bool)
    return int(mask[::2][::2].sum())


class Gemma4ClippableLinear(nnx.Module):
    """A bias-free `linear` whose input and output are clamped to bounds from the checkpoint
    (`use_clipped_linears`; the bounds are scalars, +-inf when the checkpoint sets none)."""

    def __init__(self, config, din: int, dout: int, *, dtype, rngs):
        self.linear = Linear(din, dout, dtype=dtype, rngs=rngs)
        self.clipped = bool(config.use_clipped_linears)
        if self.clipped:
            self.input_min = nnx.Param(jnp.array(-jnp.inf, jnp.float32))
            self.input_max = nnx.Param(jnp.array(jnp.inf, jnp.float32))
            self.output_min = nnx.Param(jnp.array(-jnp.inf, jnp.float32))
            self.output_max = nnx.Param(jnp.array(jnp.inf, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.clipped:
            lo, hi = self.input_min[...].astype(x.dtype), self.input_max[...].astype(x.dtype)
            x = jnp.clip(x, lo, hi)
        y = self.linear(x)
        if self.clipped:
            lo, hi = self.output_min[...].astype(y.dtype), self.output_max[...].astype(y.dtype)
            y = jnp.clip(y, lo, hi)
        return y


def _clamp(x: jax.Array, limit: float) -> jax.Array:
    # HF: min(gradient_clipping, the dtype's max), so a 1e10 bound cannot overflow fp16
    limit = min(limit, float(jnp.finfo(x.dtype).max))
    return jnp.clip(x, -limit, limit)


class Gemma4AudioLayerNorm(nnx.Module):
    """torch.nn.LayerNorm without bias (the subsampling convs' channel norm), in float32."""

    def __init__(self, dim: int, eps: float, *, dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype=dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32)).astype(x.dtype)


class Conv2dWeight(nnx.Module):
    """A bias-free Conv2d's kernel under HF's name and layout: `weight` (O, I, 3, 3)."""

    def __init__(self, cin: int, cout: int, *, dtype):
        self.weight = nnx.Param(jnp.zeros((cout, cin, 3, 3), dtype=dtype))


class Gemma4AudioSubSampleConvProjectionLayer(nnx.Module):
    def __init__(self, cin: int, cout: int, eps: float, *, dtype):
        self.conv = Conv2dWeight(cin, cout, dtype=dtype)
        self.norm = Gemma4AudioLayerNorm(cout, eps, dtype=dtype)

    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x (B, Cm, M, I) channels last, mask (B, Cm) -> (B, Cm/2, M/2, O), mask (B, Cm/2)."""
        w = self.conv.weight[...]
        x = x * mask[:, :, None, None].astype(x.dtype)  # padded frames are zeros for the conv
        y = jax.lax.conv_general_dilated(
            x.astype(w.dtype),
            w,
            window_strides=(2, 2),
            padding=((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "OIHW", "NHWC"),
        )
        return jax.nn.relu(self.norm(y)), mask[:, ::2]


class Gemma4AudioSubSampleConvProjection(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        c0, c1 = config.subsampling_conv_channels
        eps = config.rms_norm_eps
        self.layer0 = Gemma4AudioSubSampleConvProjectionLayer(1, c0, eps, dtype=dtype)
        self.layer1 = Gemma4AudioSubSampleConvProjectionLayer(c0, c1, eps, dtype=dtype)
        # HF sizes the projection as (c0 // 4) * c1: the mel bins after two stride-2 convs
        # are taken to be c0 / 4 (128 mel bins and 128 channels in the released models)
        self.input_proj_linear = Linear((c0 // 4) * c1, config.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, features: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """features (B, Cm, M), mask (B, Cm) -> (B, C, D), mask (B, C)."""
        x, mask = self.layer0(features[..., None], mask)
        x, mask = self.layer1(x, mask)
        B, C = x.shape[:2]
        # (B, C, M/4, c1) -> (B, C, M/4 * c1): mel-major, as HF's permute(0, 2, 3, 1)
        return self.input_proj_linear(x.reshape(B, C, -1)), mask


def relative_position_embeddings(config, dtype) -> jax.Array:
    """(R, D) sinusoids [sin | cos] of the distances R - 1 ... 0 (HF's rel_pos_enc)."""
    D = config.hidden_size
    context = (
        config.attention_chunk_size
        + config.attention_context_left
        - 1
        + config.attention_context_right
    )
    num = D // 2
    increment = math.log(10000.0) / max(num - 1, 1)
    # float32 as torch computes it: exp of arange * -increment
    inv = np.exp(np.arange(num, dtype=np.float32) * np.float32(-increment)).astype(np.float32)
    distances = np.arange(context // 2, -1, -1, dtype=np.float32)[:, None]
    t = distances * inv[None, :]
    return jnp.asarray(np.concatenate([np.sin(t), np.cos(t)], axis=-1), dtype=dtype)


class Gemma4AudioAttention(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        D = config.hidden_size
        self.N = config.num_attention_heads
        self.H = D // self.N
        self.W = config.attention_chunk_size
        self.past = config.attention_context_left - 1
        self.future = config.attention_context_right
        self.X = self.W + self.past + self.future
        self.cap = float(config.attention_logit_cap)
        self.invalid = float(config.attention_invalid_logits_value)
        # log(2) factors: the released weights were trained with base-2 softmax constants
        self.q_scale = (self.H**-0.5) / math.log(2)
        self.k_scale = math.log(1 + math.e) / math.log(2)
        self.q_proj = Gemma4ClippableLinear(config, D, self.N * self.H, dtype=dtype, rngs=rngs)
        self.k_proj = Gemma4ClippableLinear(config, D, self.N * self.H, dtype=dtype, rngs=rngs)
        self.v_proj = Gemma4ClippableLinear(config, D, self.N * self.H, dtype=dtype, rngs=rngs)
        self.post = Gemma4ClippableLinear(config, D, D, dtype=dtype, rngs=rngs)
        self.relative_k_proj = Linear(D, self.N * self.H, dtype=dtype, rngs=rngs)
        self.per_dim_scale = nnx.Param(jnp.zeros((self.H,), dtype=dtype))

    def _context(self, x: jax.Array, U: int) -> jax.Array:
        """x (B, C, N, H) -> each block's keys (B, U, X, N, H); outside the clip is zeros."""
        x = jnp.pad(x, ((0, 0), (self.past, self.future + self.W - 1), (0, 0), (0, 0)))
        idx = np.arange(U)[:, None] * self.W + np.arange(self.X)[None, :]  # (U, X)
        return x[:, idx]

    def _rel_shift(self, bd: jax.Array) -> jax.Array:
        """(B, N, U, W, R) logits per distance -> (B, N, U, W, X) per key (Transformer-XL:
        pad to X + 1 columns, read the rows back X at a time)."""
        B, N, U, W, R = bd.shape
        bd = jnp.pad(bd, ((0, 0),) * 4 + ((0, self.X + 1 - R),))
        bd = bd.reshape(B, N, U, W * (self.X + 1))[..., : W * self.X]
        return bd.reshape(B, N, U, W, self.X)

    def __call__(self, x: jax.Array, rel: jax.Array, allowed: jax.Array) -> jax.Array:
        """x (B, C, D), rel (R, D) sinusoids, allowed (B, U, W, X) -> (B, C, D)."""
        B, C, _ = x.shape
        N, H, W = self.N, self.H, self.W
        U = -(-C // W)
        q = self.q_proj(x).astype(jnp.float32).reshape(B, C, N, H)
        k = self.k_proj(x).astype(jnp.float32).reshape(B, C, N, H)
        v = self.v_proj(x).astype(jnp.float32).reshape(B, C, N, H)
        q = q * self.q_scale * jax.nn.softplus(self.per_dim_scale[...].astype(jnp.float32))
        k = k * self.k_scale
        q = jnp.pad(q, ((0, 0), (0, U * W - C), (0, 0), (0, 0))).reshape(B, U, W, N, H)
        k, v = self._context(k, U), self._context(v, U)
        r = self.relative_k_proj(rel).astype(jnp.float32).reshape(-1, N, H)  # (R, N, H)
        ac = jnp.einsum("BUWNH,BUXNH->BNUWX", q, k)
        bd = self._rel_shift(jnp.einsum("BUWNH,RNH->BNUWR", q, r))
        logits = jnp.tanh((ac + bd) / self.cap) * self.cap
        logits = jnp.where(allowed[:, None], logits, self.invalid)
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("BNUWX,BUXNH->BUWNH", probs, v).reshape(B, U * W, N * H)[:, :C]
        return self.post(out.astype(x.dtype))


def local_attention_mask(config, mask: jax.Array) -> jax.Array:
    """Which context keys each query may see, (B, U, W, X), from the real frames (B, C):
    real keys within the window (HF's sliding-window mask over padding, blocked)."""
    B, C = mask.shape
    W = config.attention_chunk_size
    past, future = config.attention_context_left - 1, config.attention_context_right
    X = W + past + future
    U = -(-C // W)
    q = (np.arange(U)[:, None] * W + np.arange(W)[None, :])[:, :, None]  # (U, W, 1)
    k = (np.arange(U)[:, None] * W - past + np.arange(X)[None, :])[:, None, :]  # (U, 1, X)
    dist = q - k
    # left: 0 <= dist < past (past = context_left - 1), right: 0 < -dist < future
    window = ((dist >= 0) & (dist < past)) | ((dist < 0) & (-dist < future))
    window &= (k >= 0) & (k < C) & (q < C)
    real = jnp.take(mask, np.clip(k[:, 0], 0, C - 1), axis=1)  # (B, U, X)
    return jnp.asarray(window)[None] & real[:, :, None, :]


class Gemma4AudioFeedForward(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        D = config.hidden_size
        self.ffw_layer_1 = Gemma4ClippableLinear(config, D, 4 * D, dtype=dtype, rngs=rngs)
        self.ffw_layer_2 = Gemma4ClippableLinear(config, 4 * D, D, dtype=dtype, rngs=rngs)
        # HF builds these two with the default eps, not the config's
        self.pre_layer_norm = Gemma4RMSNorm(D, dtype=dtype)
        self.post_layer_norm = Gemma4RMSNorm(D, dtype=dtype)
        self.act = config.hidden_act
        self.clip = float(config.gradient_clipping)
        self.scale = float(config.residual_weight)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.pre_layer_norm(_clamp(x, self.clip))
        h = self.ffw_layer_2(activation(self.act)(self.ffw_layer_1(h)))
        h = self.post_layer_norm(_clamp(h, self.clip))
        return x + h * self.scale


class DepthwiseConv1dWeight(nnx.Module):
    """A depthwise Conv1d's kernel under HF's name and layout: `weight` (D, 1, K)."""

    def __init__(self, D: int, K: int, *, dtype):
        self.weight = nnx.Param(jnp.zeros((D, 1, K), dtype=dtype))


class Gemma4AudioLightConv1d(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        D, eps = config.hidden_size, config.rms_norm_eps
        self.linear_start = Gemma4ClippableLinear(config, D, 2 * D, dtype=dtype, rngs=rngs)
        self.linear_end = Gemma4ClippableLinear(config, D, D, dtype=dtype, rngs=rngs)
        self.depthwise_conv1d = DepthwiseConv1dWeight(D, config.conv_kernel_size, dtype=dtype)
        self.pre_layer_norm = Gemma4RMSNorm(D, eps, dtype=dtype)
        self.conv_norm = Gemma4RMSNorm(D, eps, dtype=dtype)
        self.act = config.hidden_act
        self.clip = float(config.gradient_clipping)

    def __call__(self, x: jax.Array) -> jax.Array:  # x: (B, C, D)
        h = self.linear_start(self.pre_layer_norm(x))
        a, g = jnp.split(h, 2, axis=-1)
        h = a * jax.nn.sigmoid(g)  # GLU
        w = self.depthwise_conv1d.weight[...]  # (D, 1, K)
        K = w.shape[-1]
        # causal: K - 1 zeros on the left, so a frame sees only itself and earlier frames
        h = jax.lax.conv_general_dilated(
            h.astype(w.dtype),
            w,
            window_strides=(1,),
            padding=((K - 1, 0),),
            dimension_numbers=("NWC", "OIW", "NWC"),
            feature_group_count=w.shape[0],
        )
        h = self.conv_norm(_clamp(h, self.clip))
        return x + self.linear_end(activation(self.act)(h))


class Gemma4AudioLayer(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        D = config.hidden_size
        self.feed_forward1 = Gemma4AudioFeedForward(config, dtype=dtype, rngs=rngs)
        self.feed_forward2 = Gemma4AudioFeedForward(config, dtype=dtype, rngs=rngs)
        self.self_attn = Gemma4AudioAttention(config, dtype=dtype, rngs=rngs)
        self.lconv1d = Gemma4AudioLightConv1d(config, dtype=dtype, rngs=rngs)
        self.norm_pre_attn = Gemma4RMSNorm(D, dtype=dtype)
        self.norm_post_attn = Gemma4RMSNorm(D, dtype=dtype)
        self.norm_out = Gemma4RMSNorm(D, dtype=dtype)
        self.clip = float(config.gradient_clipping)

    def __call__(self, x: jax.Array, rel: jax.Array, allowed: jax.Array) -> jax.Array:
        x = self.feed_forward1(x)
        h = self.self_attn(self.norm_pre_attn(_clamp(x, self.clip)), rel, allowed)
        x = x + self.norm_post_attn(_clamp(h, self.clip))
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(_clamp(x, self.clip))


class Gemma4AudioModel(nnx.Module):
    """The tower: features (B, Cm, M) + real-frame mask (B, Cm) -> (B, C, Do), mask (B, C)."""

    def __init__(self, config, *, dtype=jnp.float32, rngs):
        self.config = config
        self.dtype = dtype
        self.subsample_conv_projection = Gemma4AudioSubSampleConvProjection(
            config, dtype=dtype, rngs=rngs
        )
        self.layers = nnx.List(
            [
                Gemma4AudioLayer(config, dtype=dtype, rngs=rngs)
                for _ in range(config.num_hidden_layers)
            ]
        )
        self.output_proj = Linear(
            config.hidden_size, config.output_proj_dims, bias=True, dtype=dtype, rngs=rngs
        )

    def __call__(self, features: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        mask = mask.astype(bool)
        x, mask = self.subsample_conv_projection(features.astype(self.dtype), mask)
        rel = relative_position_embeddings(self.config, x.dtype)
        allowed = local_attention_mask(self.config, mask)
        for layer in self.layers:
            x = layer(x, rel, allowed)
        return self.output_proj(x), mask


class Gemma4MultimodalEmbedder(nnx.Module):
    """Tower rows into the text width: RMSNorm without scale, then `embedding_projection`."""

    def __init__(self, mm_config, text_config, *, dtype=jnp.float32, rngs):
        Dm = getattr(mm_config, "output_proj_dims", None) or mm_config.hidden_size
        self.embedding_pre_projection_norm = Gemma4RMSNorm(
            Dm, mm_config.rms_norm_eps, with_scale=False, dtype=dtype
        )
        self.embedding_projection = Linear(Dm, text_config.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.embedding_projection(self.embedding_pre_projection_norm(x))


# ---------------------------------------------------------------------------------------
# The front end's and the encoder stage's host side


def audio_item_features(feature_extractor, audio: np.ndarray, sampling_rate: int, kwargs) -> dict:
    """One mono clip at the extractor's rate -> what Gemma4Processor hands the tower for it:
    `input_features` (Cm, M) float32 and `input_features_mask` (Cm,) of real frames.

    The clip is not padded to the 30 s window (HF pads a prompt's clips to the longest of
    them, which changes none of a clip's real frames); `kwargs` are the request's
    `mm_processor_kwargs`. Fits the audio front end's `mm_audio_features` hook.
    """
    opts = {"padding": "longest", **dict(kwargs or {})}
    # a batch of one: Gemma4AudioFeatureExtractor mis-reads a bare 1-D array
    out = feature_extractor([audio], sampling_rate=sampling_rate, return_tensors="np", **opts)
    mask = np.asarray(out["input_features_mask"][0]).astype(bool)
    if not mask.any():
        raise ValueError(
            f"audio of {audio.shape[-1]} samples is too short for one mel frame "
            f"({feature_extractor.frame_length + 1 - feature_extractor.frame_length // 2} "
            "samples at least)"
        )
    return {
        "input_features": np.asarray(out["input_features"][0], np.float32),
        "input_features_mask": mask,
    }


def encode_audio_items(
    run: Callable[[object, np.ndarray, np.ndarray], jax.Array], params, items: list[dict]
) -> list[DeviceRows]:
    """Items holding `input_features` (Cm, M) and `input_features_mask` (Cm,) -> each
    item's rows (its audio soft tokens), left on the device.

    `run(params, features (B, Cm, M), mask (B, Cm)) -> (B, C, D)` is the model's jitted
    tower + embedder. Items are padded to one frame bucket per call (a power of two, at
    least `MIN_FRAME_BUCKET`) and batched up to `MAX_AUDIOS_PER_CALL`, the batch padded
    to a power of two: padding changes no real row (see the module docstring).
    """
    feats = [np.asarray(it["input_features"], np.float32) for it in items]
    masks = [np.asarray(it["input_features_mask"]).astype(bool) for it in items]
    out: list[DeviceRows] = []
    for i in range(0, len(items), MAX_AUDIOS_PER_CALL):
        f, m = feats[i : i + MAX_AUDIOS_PER_CALL], masks[i : i + MAX_AUDIOS_PER_CALL]
        # real frames only: what follows the last real frame is padding (masked anyway)
        lengths = [int(np.flatnonzero(x)[-1]) + 1 if x.any() else 1 for x in m]
        Cm = max(MIN_FRAME_BUCKET, next_pow2(max(lengths)))
        B = next_pow2(len(f))
        features = np.zeros((B, Cm, f[0].shape[-1]), np.float32)
        mask = np.zeros((B, Cm), bool)
        for j, (x, y, n) in enumerate(zip(f, m, lengths, strict=True)):
            features[j, :n] = x[:n]
            mask[j, :n] = y[:n]
        rows = run(params, features, mask)  # (B, C, D)
        C = rows.shape[1]
        flat = rows.reshape(-1, rows.shape[-1])
        for j, y in enumerate(m):
            out.append(DeviceRows(flat, j * C, j * C + audio_num_tokens(y)))
    return out
