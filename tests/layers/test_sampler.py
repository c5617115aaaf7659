"""Sampling statistics: top-k/top-p mass, min-p, penalties, seeds."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxmm.layers.sampler import SamplingTensors, sample


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
