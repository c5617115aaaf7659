"""Qwen2-VL vision attention: the packed (segments x slots) layout vs the dense masked oracle."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxmm.models.encoders.qwen2_vl_vision import (
    _xla_attention,
    ladder,
    pack,
    packed_attention,
    segment_attention,
    segments,
)


def _qkv(N: int, Hn: int = 2, Hd: int = 8, seed: int = 0):
    rs = np.random.RandomState(seed)
    return [jnp.asarray(rs.randn(N, Hn, Hd), jnp.float32) for _ in range(3)]


def _segment_ids(lengths, N: int) -> np.ndarray:
    """Dense oracle ids: one per segment, padding patches its own segment (-1)."""
    seg = np.full(N, -1, np.int32)
    seg[: sum(lengths)] = np.repeat(np.arange(len(lengths)), lengths)
    return seg


def _check(lengths, B: int, C: int, N: int, seed: int = 0):
    q, k, v = _qkv(N, seed=seed)
    segs = segments(lengths, B, C, N)
    got = packed_attention(q, k, v, segs, 0.3, "xla")
    want = segment_attention(q, k, v, jnp.asarray(_segment_ids(lengths, N)), 0.3, block=N)
    real = sum(lengths)  # padding patches carry whatever they gather: never read back
    np.testing.assert_allclose(np.asarray(got)[:real], np.asarray(want)[:real], atol=1e-5)


def test_items_of_different_lengths_with_padding():
    # three items, padding segments (B 4 > 3), padding slots (C 64 > 50), padding patches
    _check([50, 12, 30], B=4, C=64, N=128)


def test_one_segment_filling_the_bucket_skips_the_gathers():
    _check([50], B=1, C=64, N=64, seed=3)  # padding patches 50..63 in the same layout


def test_windowed_layout_with_partial_windows():
    # windows of up to 16 patches, the edge ones partial, as Qwen2.5-VL packs them
    _check([16, 8, 16, 8, 4, 16, 16, 12], B=10, C=16, N=128, seed=1)


def test_query_blocks_when_the_scores_pass_the_budget():
    q, k, v = _qkv(256, seed=2)
    segs = segments([200, 40], 2, 256, 256)
    full = packed_attention(q, k, v, segs, 0.3, "xla")
    qs, ks, vs = q[segs.index], k[segs.index], v[segs.index]
    # a budget of (B 2, Hn 2, 32 queries, C 256) scores: eight blocks of 32 queries
    blocked = _xla_attention(qs, ks, vs, jnp.asarray(segs.lens), 0.3, budget=2 * 2 * 32 * 256)
    blocked = blocked.reshape(-1, 2, 8)[segs.slot]
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(full), atol=1e-6)


def test_pack_layouts_match_the_segment_ids_of_frames_and_windows():
    from types import SimpleNamespace

    vc = SimpleNamespace(spatial_merge_size=2, patch_size=4, window_size=16)  # 2x2 units
    rows = np.arange(144, dtype=np.float32)[:, None]  # pixel value = row in item order
    items = [(rows[:120], (2, 6, 10)), (rows[120:], (1, 4, 6))]
    batch = pack(items, vc, windowed=True)
    N = len(batch["pixels"])
    assert N == ladder(2 * 60 + 24, 64) == 192
    # the first window: merged units 0, 1, 5, 6 of the 3x5 grid, their 2x2 patches each
    first = batch["pixels"][batch["order"]][:16, 0]
    np.testing.assert_array_equal(first, [0, 1, 2, 3, 4, 5, 6, 7, 20, 21, 22, 23, 24, 25, 26, 27])
    full, window = batch["full"], batch["window"]
    assert full.index.shape == (4, 64) and list(full.lens) == [60, 60, 24, 0]
    # frame 6x10 patches = 3x5 units -> 2x3 windows of 2x2 units (16, 8 patches at edges)
    assert window.index.shape[1] == 16 and sum(window.lens) == 144
    assert list(window.lens[:6]) == [16, 16, 8, 8, 8, 4]
    for segs in (full, window):
        assert np.all(segs.index[segs.lens == 0] == 0)  # padding segments read patch 0
        real = np.arange(segs.index.shape[1]) < segs.lens[:, None]
        np.testing.assert_array_equal(segs.index[real], np.arange(144))  # contiguous runs
        flat = segs.index.reshape(-1)
        np.testing.assert_array_equal(flat[segs.slot[:144]], np.arange(144))  # round trip


@pytest.mark.parametrize(
    "n,want", [(1, 64), (64, 64), (65, 128), (1024, 1024), (1025, 1152), (9216, 9216)]
)
def test_patch_buckets_are_eight_per_octave(n, want):
    assert ladder(n, 64) == want
    assert ladder(9217, 64) == 10240 and ladder(100, 8) == 104
