"""Blockwise attention over a cache (online softmax, run-time fill bound) equals the dense reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax import blockwise, kv_cache, quant
from gemma_jax.attention import dot_attention
from gemma_jax.kv_cache import EMPTY, LayerCache

B, N, K, H = 3, 4, 2, 8
SCALE, CAP = H**-0.5, 5.0  # a cap small enough to bend the scores


def empty_cache(size: int, dtype=jnp.float32) -> LayerCache:
    scale = jnp.zeros((B, K, 1, size)) if kv_cache.is_quantized(dtype) else None
    return LayerCache(
        k=jnp.zeros((B, K, H, size), dtype),
        v=jnp.zeros((B, K, size, H), dtype),
        positions=jnp.full((B, size), EMPTY, jnp.int32),
        k_scale=scale,
        v_scale=scale,
    )


def as_stored(x: np.ndarray, dtype) -> np.ndarray:
    """What a cache of `dtype` gives back for keys or values x [B, S, K, H]: dequantized per (row, token, head)."""
    return np.asarray(quant.quantize(jnp.asarray(x), 1, dtype).dequantize()) if kv_cache.is_quantized(dtype) else x


def case(rng, history: list[int], new: list[int], size: int, window: int | None, block: int, dtype=jnp.float32):
    """Rows hold `history[r]` cached tokens and get `new[r]` more (left-padded to max(new)): blockwise vs dense.

    With an 8-bit cache `dtype`, the dense reference reads the history dequantized (the new tokens' own keys
    are not stored, so they stay exact)."""
    t, total = max(new), max(h + n for h, n in zip(history, new, strict=True))
    keys = rng.standard_normal((B, total, K, H)).astype(np.float32)
    values = rng.standard_normal((B, total, K, H)).astype(np.float32)
    q = rng.standard_normal((B, t, N, H)).astype(np.float32) * 3
    q_pos = np.full((B, t), EMPTY, np.int32)
    k_new, v_new = np.zeros((B, t, K, H), np.float32), np.zeros((B, t, K, H), np.float32)
    cache = empty_cache(size, dtype)
    for r, (h, n) in enumerate(zip(history, new, strict=True)):
        q_pos[r, t - n :] = np.arange(h, h + n)
        k_new[r, t - n :], v_new[r, t - n :] = keys[r, h : h + n], values[r, h : h + n]
    # The history goes in as one left-padded write, as a prefill would.
    hist_pos = np.full((B, max(max(history), 1)), EMPTY, np.int32)
    hist_k = np.zeros((B, hist_pos.shape[1], K, H), np.float32)
    hist_v = np.zeros_like(hist_k)
    for r, h in enumerate(history):
        if h:
            hist_pos[r, -h:] = np.arange(h)
            hist_k[r, -h:], hist_v[r, -h:] = keys[r, :h], values[r, :h]
    cache = kv_cache.write(cache, hist_k, hist_v, jnp.asarray(hist_pos), ring=window is not None)

    got = blockwise.attend(
        jnp.asarray(q), jnp.asarray(q_pos), jnp.asarray(k_new), jnp.asarray(v_new), cache,
        window=window, scale=SCALE, cap=CAP, block=block,
    )  # fmt: skip
    # Dense reference over every token each row has ever seen.
    all_pos = np.full((B, total), EMPTY, np.int32)
    keys_seen, values_seen = keys.copy(), values.copy()
    for r, (h, n) in enumerate(zip(history, new, strict=True)):
        all_pos[r, : h + n] = np.arange(h + n)
        keys_seen[r, :h], values_seen[r, :h] = as_stored(keys, dtype)[r, :h], as_stored(values, dtype)[r, :h]
    mask = blockwise.attention_mask(jnp.asarray(q_pos), jnp.asarray(all_pos), window)
    want = dot_attention(jnp.asarray(q), jnp.asarray(keys_seen), jnp.asarray(values_seen), mask, SCALE, CAP)
    valid = q_pos >= 0
    return np.asarray(got)[valid], np.asarray(want)[valid]


BLOCK = 8
CASES = {
    # global cache of 29 slots (not a multiple of the block: the last block overlaps the one before)
    "ragged": ([13, 3, 21], [1, 1, 1], 29, None),
    "at-block-boundary": ([8, 16, 24], [1, 1, 1], 29, None),
    "one-before-boundary": ([7, 15, 23], [1, 1, 1], 29, None),
    "one-after-boundary": ([9, 17, 25], [1, 1, 1], 29, None),
    "last-slot": ([28, 0, 5], [1, 1, 1], 29, None),
    "empty-cache-prefill": ([0, 0, 0], [12, 5, 1], 29, None),
    "chunk-after-prefix": ([8, 3, 0], [11, 4, 9], 29, None),
    "free-row": ([8, 0, 4], [1, 0, 1], 29, None),
    # sliding window 6 in a ring of 6 slots: wrapped rows, a chunk longer than the ring
    "ring-decode": ([13, 6, 2], [1, 1, 1], 6, 6),
    "ring-wrapped-chunk": ([17, 5, 0], [9, 3, 14], 6, 6),
    # a window wider than one block, ring of 10 read in blocks of 8
    "ring-two-blocks": ([23, 10, 9], [1, 2, 1], 10, 10),
}


@pytest.mark.parametrize("name", CASES)
def test_blockwise_equals_dense(name):
    history, new, size, window = CASES[name]
    got, want = case(np.random.default_rng(0), history, new, size, window, BLOCK)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


# 8-bit caches against float32: attention outputs are averages of unit-normal values, so an absolute bound.
# Measured max |diff| over all CASES: int8 0.011, fp8 0.073 (e4m3 keeps 3 mantissa bits).
LOOSE = {"int8": 0.03, "fp8": 0.15}
CASES_8BIT = ("ragged", "chunk-after-prefix", "free-row", "ring-wrapped-chunk", "ring-two-blocks")


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
@pytest.mark.parametrize("name", CASES_8BIT)
def test_8bit_cache_equals_dense_on_the_dequantized_cache(name, dtype):
    """The scales applied per key block (scores, probabilities) equal attention over the dequantized cache;
    and the 8-bit cache stays close to a float32 one."""
    history, new, size, window = CASES[name]
    cache_dtype = kv_cache.cache_dtype(dtype)
    got, want = case(np.random.default_rng(0), history, new, size, window, BLOCK, cache_dtype)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    exact, _ = case(np.random.default_rng(0), history, new, size, window, BLOCK)
    np.testing.assert_allclose(got, exact, atol=LOOSE[dtype], rtol=0)


def test_reads_only_filled_blocks():
    """The loop's trip count is the fill, not the capacity: garbage past the filled bound is never read."""
    rng = np.random.default_rng(1)
    got, want = case(rng, [5, 9, 2], [1, 1, 1], 64, None, BLOCK)
    cache = empty_cache(64)
    poisoned = cache.replace(k=cache.k.at[..., 16:].set(jnp.nan), v=cache.v.at[:, :, 16:].set(jnp.nan))
    q = jnp.ones((B, 1, N, H))
    out = blockwise.attend(
        q, jnp.asarray([[5], [9], [2]], jnp.int32), jnp.ones((B, 1, K, H)), jnp.ones((B, 1, K, H)), poisoned,
        window=None, scale=SCALE, cap=CAP, block=BLOCK,
    )  # fmt: skip
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_view_of_stacked_cache_reads_and_writes_in_place():
    """A view (layer i of a [G, ...] stack) reads and writes exactly that layer."""
    stack = jax.tree.map(lambda x: jnp.stack([x] * 3), empty_cache(16))
    k = jnp.arange(B * 2 * K * H, dtype=jnp.float32).reshape(B, 2, K, H)
    pos = jnp.asarray([[0, 1]] * B, jnp.int32)
    written = kv_cache.write(stack.view(jnp.int32(1)), k, -k, pos, ring=False).stacked()
    alone = kv_cache.write(empty_cache(16), k, -k, pos, ring=False)
    for i in (0, 2):
        np.testing.assert_array_equal(written.positions[i], EMPTY)
    np.testing.assert_array_equal(written.k[1], alone.k)
    np.testing.assert_array_equal(written.v[1], alone.v)
    got = kv_cache.read(written.view(jnp.int32(1)), jnp.int32(0), 2)
    want = kv_cache.read(alone, jnp.int32(0), 2)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
