"""The KV-cache hook: prefill chunks + single-token steps give the same logits as one full forward."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import left_padded
from flax import nnx

import gemma_jax as gj


@pytest.fixture(scope="module")
def model():
    config = gj.gemma2_tiny(sliding_window=8, num_layers=5)  # ring of 8 slots, scanned groups + a tail layer
    return gj.Transformer(config, rngs=nnx.Rngs(0))


@nnx.jit
def step(model, tokens, positions, mask, cache):
    return model(tokens, positions, mask, cache=cache)


def run_chunks(model, tokens, mask, chunks, cache_length=64):
    """Feed [B, T] in consecutive chunks through the cache; return the logits of all steps, concatenated."""
    positions = np.cumsum(mask, axis=1) - 1
    cache = gj.KVCache.create(model.config, tokens.shape[0], cache_length, jnp.float32)
    out, start = [], 0
    for size in chunks:
        sl = slice(start, start + size)
        logits, cache = step(
            model, jnp.asarray(tokens[:, sl]), jnp.asarray(positions[:, sl]), jnp.asarray(mask[:, sl]), cache
        )
        out.append(np.asarray(logits))
        start += size
    assert start == tokens.shape[1]
    return np.concatenate(out, axis=1), cache


@pytest.mark.parametrize("chunks", [[12] + [1] * 18, [5, 7, 1, 1, 16], [30]], ids=["prefill12", "mixed", "one"])
def test_cached_equals_full_forward(model, chunks):
    # rows of different lengths, left-padded: the ring wraps several times on the long row
    tokens, mask = left_padded(np.random.default_rng(0), [30, 19, 4], model.config.vocab_size)
    full, _ = model(jnp.asarray(tokens), mask=jnp.asarray(mask))
    cached, _ = run_chunks(model, tokens, mask, chunks)
    np.testing.assert_allclose(cached[mask], np.asarray(full)[mask], atol=1e-5, rtol=0)


def test_ring_holds_last_window(model):
    tokens, mask = left_padded(np.random.default_rng(1), [30], model.config.vocab_size)
    _, cache = run_chunks(model, tokens, mask, [12, 18])
    sliding = cache.groups[0]  # pattern slot 0 is a sliding layer: [G, B, 8] positions
    assert sliding.positions.shape[-1] == 8
    assert sorted(np.asarray(sliding.positions[0, 0]).tolist()) == list(range(22, 30))
    full = cache.groups[1]  # global layer: slot = position
    np.testing.assert_array_equal(np.asarray(full.positions[0, 0, :30]), np.arange(30))
    assert (np.asarray(full.positions[0, 0, 30:]) == -1).all()


def test_9b_cache_bytes_at_16k():
    """Sliding layers hold a 4096 ring: 21 x (16384 + 4096) x 8 KiB = 3.5 GB bf16, not 5.6 GB."""
    import jax

    cache = jax.eval_shape(lambda: gj.KVCache.create(gj.gemma2_9b(), 1, 16384, jnp.bfloat16))
    kv_bytes = sum(x.size * x.dtype.itemsize for c in cache.groups for x in (c.k, c.v))
    assert kv_bytes == 21 * (16384 + 4096) * 8 * 1024
    assert 3.4e9 < kv_bytes < 3.6e9
