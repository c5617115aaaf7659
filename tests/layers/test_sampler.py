"""Sampling statistics: top-k/top-p mass, min-p, penalties, seeds."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxmm.layers.sampler import SamplingTensors, _filter, sample


def tensors(S, **kw):
    base = dict(
        temperature=np.ones(S, np.float32),
        top_k=np.zeros(S, np.int32),
        top_p=np.ones(S, np.float32),
        min_p=np.zeros(S, np.float32),
        seeds=np.arange(S, dtype=np.uint32),
        steps=np.zeros(S, np.int32),
        presence=np.zeros(S, np.float32),
        frequency=np.zeros(S, np.float32),
        repetition=np.ones(S, np.float32),
        seen_tokens=np.full((S, 1), -1, np.int32),
        seen_is_output=np.zeros((S, 1), bool),
        banned=np.full((S, 1), -1, np.int32),
    )
    base.update(kw)
    return SamplingTensors(**{k: jnp.asarray(v) for k, v in base.items()})


PROBS = np.array([0.4, 0.3, 0.15, 0.1, 0.05], np.float32)
LOGITS = np.log(PROBS)
fn = jax.jit(sample, static_argnames=("all_greedy", "use_filters", "use_penalties", "num_logprobs"))


def draw(S=4000, **kw):
    t = tensors(S, **kw)
    logits = jnp.asarray(np.tile(LOGITS, (S, 1)))
    tok, *_ = fn(
        logits, t, all_greedy=False, use_filters=True, use_penalties=False, num_logprobs=-1
    )
    return np.bincount(np.asarray(tok), minlength=5) / S


def test_plain_sampling_matches_distribution():
    freq = draw()
    assert np.allclose(freq, PROBS, atol=0.03)


def test_top_k():
    freq = draw(top_k=np.full(4000, 2, np.int32))
    assert freq[2:].sum() == 0
    assert np.allclose(freq[:2], PROBS[:2] / PROBS[:2].sum(), atol=0.03)


def test_top_p():
    freq = draw(top_p=np.full(4000, 0.75, np.float32))  # keeps 0.4 + 0.3 + 0.15 (crosses 0.75)
    assert freq[3:].sum() == 0
    assert np.allclose(freq[:3], PROBS[:3] / PROBS[:3].sum(), atol=0.03)


def test_min_p():
    freq = draw(min_p=np.full(4000, 0.3, np.float32))  # threshold 0.12
    assert freq[3:].sum() == 0 and freq[2] > 0


def test_greedy_rows_and_seed_reproducibility():
    S = 8
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((S, 50)), jnp.float32)
    temps = np.array([0, 1, 1, 1, 0, 1, 1, 1], np.float32)
    t = tensors(S, temperature=temps, seeds=np.full(S, 42, np.uint32))
    a, *_ = fn(logits, t, all_greedy=False, use_filters=False, use_penalties=False, num_logprobs=-1)
    a = np.asarray(a)
    assert a[0] == np.argmax(logits[0]) and a[4] == np.argmax(logits[4])
    # same seed & step & logits -> same token, whatever else is in the batch
    logits2 = logits.at[1:].set(logits[1])
    b, *_ = fn(
        logits2, t, all_greedy=False, use_filters=False, use_penalties=False, num_logprobs=-1
    )
    assert np.asarray(b)[1] == a[1]
    t2 = tensors(S, temperature=temps, seeds=np.full(S, 42, np.uint32), steps=np.ones(S, np.int32))
    draws = [
        np.asarray(
            fn(
                logits,
                t2,
                all_greedy=False,
                use_filters=False,
                use_penalties=False,
                num_logprobs=-1,
            )[0]
        )
        for _ in range(2)
    ]
    assert (draws[0] == draws[1]).all()


def test_penalties_and_banned():
    S, V = 2, 5
    logits = jnp.asarray(np.tile(np.array([2.0, 1.9, 0.0, -1.0, -2.0], np.float32), (S, 1)))
    t = tensors(
        S,
        temperature=np.zeros(S, np.float32),
        repetition=np.array([2.0, 1.0], np.float32),
        frequency=np.array([0.0, 1.5], np.float32),
        seen_tokens=np.array([[0, -1], [0, 0]], np.int32),
        seen_is_output=np.array([[False, False], [True, True]]),
        banned=np.array([[-1], [1]], np.int32),
    )
    tok, *_ = fn(logits, t, all_greedy=True, use_filters=False, use_penalties=True, num_logprobs=-1)
    tok = np.asarray(tok)
    assert tok[0] == 1  # 2.0 / 2 = 1.0 < 1.9
    assert tok[1] == 2  # token 0: 2 - 1.5 * 2 = -1; token 1 banned; token 2 keeps 0.0
    del V


def test_logprobs_are_raw_log_softmax():
    S = 3
    logits = jnp.asarray(np.random.default_rng(1).standard_normal((S, 30)), jnp.float32)
    t = tensors(S, temperature=np.zeros(S, np.float32))
    tok, (lp, rank), ids, tlp = fn(
        logits, t, all_greedy=True, use_filters=False, use_penalties=False, num_logprobs=20
    )
    ref = jax.nn.log_softmax(logits, axis=-1)
    np.testing.assert_allclose(
        np.asarray(tlp), np.sort(np.asarray(ref), axis=-1)[:, ::-1][:, :20], atol=1e-6
    )
    assert (np.asarray(rank) == 1).all()
    np.testing.assert_allclose(np.asarray(lp), np.asarray(ref).max(-1), atol=1e-6)


# -- the filters' thresholds against a sort-based reference --------------------------------


def sorted_reference(logits, top_k, top_p, min_p):
    """The cuts made on each row sorted in descending order (float64): top-k, then top-p over
    the top-k survivors (the token that crosses top_p is kept), then min-p. Returns the kept
    mask."""
    keep = np.zeros(logits.shape, bool)
    for i, row in enumerate(logits.astype(np.float64)):
        srt = np.sort(row)[::-1]
        k = top_k[i] if 0 < top_k[i] < len(row) else len(row)
        row = np.where(row < srt[k - 1], -np.inf, row)
        if top_p[i] < 1:
            p = np.exp(row - row.max())
            p /= p.sum()
            ps = np.sort(p)[::-1]
            before = np.cumsum(ps) - ps
            cutoff = ps[before < top_p[i]].min()
            row = np.where(p < cutoff, -np.inf, row)
        if min_p[i] > 0:
            p = np.exp(row - row.max())
            row = np.where(p < min_p[i], -np.inf, row)
        keep[i] = np.isfinite(row)
    return keep


filter_fn = jax.jit(_filter)


def kept(logits, **kw):
    t = tensors(len(logits), **{k: np.asarray(v) for k, v in kw.items()})
    return np.isfinite(np.asarray(filter_fn(jnp.asarray(logits), t)))


def test_filters_match_the_sorted_reference():
    rng = np.random.default_rng(0)
    S, V = 12, 3000
    peaked = rng.standard_normal((S, V)).astype(np.float32) * 4  # a few tokens hold the mass
    flat = rng.standard_normal((S, V)).astype(np.float32) * 0.3  # top-p needs > 256 tokens
    ties = np.round(rng.standard_normal((S, V)) * 2).astype(np.float32)  # many equal values
    top_k = np.array([0, 1, 5, 40, 0, 0, 40, 300, 0, 2999, 3000, 7], np.int32)
    top_p = np.array([1, 1, 1, 1, 0.5, 0.9, 0.95, 1, 0.99, 0.8, 0.3, 0.7], np.float32)
    min_p = np.array([0, 0, 0, 0.1, 0, 0, 0, 0, 0.05, 0, 0, 0.2], np.float32)
    for logits in (peaked, flat, ties):
        for rows in (slice(0, S), slice(0, 7), slice(4, 7)):  # with and without fallbacks
            want = sorted_reference(logits[rows], top_k[rows], top_p[rows], min_p[rows])
            got = kept(logits[rows], top_k=top_k[rows], top_p=top_p[rows], min_p=min_p[rows])
            np.testing.assert_array_equal(got, want)


def test_a_rows_cut_does_not_depend_on_its_batch():
    rng = np.random.default_rng(1)
    row = rng.standard_normal((1, 2000)).astype(np.float32) * 5
    alone = kept(row, top_k=[20], top_p=[0.9], min_p=[0.0])
    # a flat row with a large top_k sends the batch down the bisection paths
    batch = np.concatenate([row, rng.standard_normal((1, 2000)).astype(np.float32) * 0.1])
    both = kept(batch, top_k=[20, 1500], top_p=[0.9, 0.99], min_p=[0.0, 0.0])
    np.testing.assert_array_equal(both[:1], alone)
    assert 1 <= alone.sum() <= 20 and both[1].sum() > 256
