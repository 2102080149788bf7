"""Sampling filters: greedy, top-k, top-p, min-p per row; frequencies match the truncated distribution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.sampling import SamplingParams, filtered_logits, sample

# A fixed distribution over 6 tokens, deliberately not sorted by id.
PROBS = np.array([0.05, 0.30, 0.10, 0.40, 0.02, 0.13])
LOGITS = np.log(PROBS).astype(np.float32)
N = 16_384  # draws per frequency test
jit_sample = jax.jit(sample)


def kept(**kw) -> np.ndarray:
    """The normalized distribution after the filters, by token id."""
    scaled, order = filtered_logits(jnp.asarray(LOGITS)[None], SamplingParams.create(1, temperature=1.0, **kw))
    probs = np.zeros(len(PROBS))
    probs[np.asarray(order[0])] = np.asarray(jax.nn.softmax(scaled[0]))
    return probs


def truncated(ids) -> np.ndarray:
    p = np.zeros(len(PROBS))
    p[ids] = PROBS[ids]
    return p / p.sum()


@pytest.mark.parametrize(
    "kw, ids",
    [
        ({}, [0, 1, 2, 3, 4, 5]),
        ({"top_k": 2}, [3, 1]),
        ({"top_p": 0.7}, [3, 1]),  # 0.40 + 0.30 reaches 0.7
        ({"top_p": 0.71}, [3, 1, 5]),
        ({"top_p": 0.1}, [3]),  # the best token always stays
        ({"min_p": 0.3}, [3, 1, 5]),  # >= 0.3 * 0.40
        ({"top_k": 3, "top_p": 0.8}, [3, 1]),  # top-p on the renormalized top 3: 0.40/0.83 + 0.30/0.83 > 0.8
    ],
)
def test_filters_keep_the_right_tokens(kw, ids):
    np.testing.assert_allclose(kept(**kw), truncated(ids), atol=1e-6)


def test_top_p_frequencies_match_truncated_distribution():
    """Chi-square test with a fixed seed: 16k draws with top_p=0.8 follow {3, 1, 5} renormalized."""
    params = SamplingParams.create(N, temperature=1.0, top_p=0.8)
    keys = jax.random.split(jax.random.key(0), N)
    tokens = np.asarray(jit_sample(jnp.broadcast_to(jnp.asarray(LOGITS), (N, len(PROBS))), params, keys))
    counts = np.bincount(tokens, minlength=len(PROBS))
    expected = truncated([3, 1, 5]) * N
    assert counts[[0, 2, 4]].sum() == 0
    support = expected > 0
    chi2 = (((counts - expected) ** 2)[support] / expected[support]).sum()
    assert chi2 < 13.8  # 2 degrees of freedom, p = 0.001


def chi2_against(tokens: np.ndarray, probs: np.ndarray) -> float:
    counts = np.bincount(tokens, minlength=len(probs))
    expected = probs * len(tokens)
    return float(((counts - expected) ** 2 / expected).sum())


def test_unfiltered_frequencies_match_tempered_softmax():
    """Temperature alone (the path that skips the sort) samples softmax(logits / T)."""
    params = SamplingParams.create(N, temperature=0.7)
    keys = jax.random.split(jax.random.key(3), N)
    tokens = np.asarray(jit_sample(jnp.broadcast_to(jnp.asarray(LOGITS), (N, len(PROBS))), params, keys))
    assert chi2_against(tokens, np.asarray(jax.nn.softmax(LOGITS / 0.7))) < 20.5  # 5 d.o.f., p = 0.001


def test_row_token_does_not_depend_on_batch_mates():
    """A server mixes requests: the same row, key and settings give the same token whatever the other rows use."""
    logits = jnp.asarray(np.stack([LOGITS] * 4))
    keys = jax.random.split(jax.random.key(4), 4)
    alone = SamplingParams.create(4, temperature=1.0)
    mixed = SamplingParams.create(4, temperature=1.0, top_k=[0, 2, 0, 3], top_p=[1.0, 1.0, 0.9, 1.0])
    a, b = np.asarray(jit_sample(logits, alone, keys)), np.asarray(jit_sample(logits, mixed, keys))
    assert a[0] == b[0]


def test_rows_use_their_own_settings():
    logits = jnp.asarray(np.stack([LOGITS, LOGITS, LOGITS]))
    params = SamplingParams.create(3, temperature=[0.0, 1.0, 1.0], top_k=[0, 1, 0], top_p=[1.0, 1.0, 0.05])
    keys = jax.random.split(jax.random.key(1), 3)
    assert np.asarray(sample(logits, params, keys)).tolist() == [3, 3, 3]  # greedy, top-1, tiny nucleus


def test_same_key_same_tokens_and_temperature_flattens():
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (N, len(PROBS)))
    keys = jax.random.split(jax.random.key(2), N)
    cold = np.asarray(jit_sample(logits, SamplingParams.create(N, temperature=0.5), keys))
    hot = np.asarray(jit_sample(logits, SamplingParams.create(N, temperature=2.0), keys))
    np.testing.assert_array_equal(cold, np.asarray(jit_sample(logits, SamplingParams.create(N, temperature=0.5), keys)))
    assert (cold == 3).mean() > (hot == 3).mean() + 0.1


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
    ],
)
def test_invalid_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams.create(2, **kw)
