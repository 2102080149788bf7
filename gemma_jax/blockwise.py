"""Attention over a KV cache in key blocks with an online softmax: cost follows the tokens held, not the capacity.

softmax over all keys equals a running (max m, sum l, weighted values acc) updated block by block
(Milakov & Gimelshein 2018; FlashAttention): scores of one block at a time, [B, K, G, T, block].
The cache is read only up to `kv_cache.filled_bound`, a run-time bound, so a decode step in a 16k
cache that holds 600 tokens reads two 512-slot blocks; the new tokens' own keys are a second
source, so a prefill chunk never concatenates the cache. Masks come from positions (causal, window,
EMPTY), which covers left padding, rings and rows of different lengths alike. This is the portable
path (every backend); `attention.dot_attention` is the dense reference it is tested against.

An 8-bit cache (kv_cache.py) is read as stored, one block at a time: the 8-bit keys are upcast inside the
q.k product and their per-slot scales multiply the scores; the value scales multiply the probabilities
before the p.v product (sum_s p_s (v_s c_s) = sum_s (p_s c_s) v_s). Nothing dequantizes the cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma_jax import kv_cache
from gemma_jax.kv_cache import EMPTY, LayerCache

BLOCK = 512  # key slots per step: large enough that the loop's overhead is small on CPU

MASKED = float(jnp.finfo(jnp.float32).min)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap): bounds logits smoothly; None disables it."""
    return x if cap is None else jnp.tanh(x / cap) * cap


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | None) -> jax.Array:
    """[B, T, S] True where query t may see key s: key present, causal, and inside the window.

    The window test is HF's `k > q - window`: a query sees itself and the window-1 keys before it.
    """
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask &= k > q - window
    return mask


def _update(carry, q, k, v, q_pos, k_pos, window, scale, cap, k_scale=None, v_scale=None):
    """Fold one key block into the running softmax. q [B, K, G, T, H]; k [B, K, H, S]; v [B, K, S, H]; k_pos [B, S];
    the scales [B, K, 1, S] of an 8-bit block (None otherwise)."""
    m, l, acc = carry  # [B, K, G, T], [B, K, G, T], [B, K, G, T, H] float32
    if k_scale is not None:  # 8-bit values, exact in the compute dtype: upcast inside the products
        k, v = k.astype(q.dtype), v.astype(q.dtype)
    s = jnp.einsum("BKGTH,BKHS->BKGTS", q, k, preferred_element_type=jnp.float32)
    s = softcap(s * (scale if k_scale is None else scale * k_scale[:, :, :, None]), cap)
    mask = attention_mask(q_pos, k_pos, window)[:, None, None]  # [B, 1, 1, T, S]
    s = jnp.where(mask, s, MASKED)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)  # a masked key adds nothing, even in an all-masked row
    correction = jnp.exp(m - m_new)
    l = l * correction + jnp.sum(p, axis=-1)
    if v_scale is not None:
        p = p * v_scale[:, :, :, None]
    pv = jnp.einsum("BKGTS,BKSH->BKGTH", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l, acc * correction[..., None] + pv


def attend(
    q: jax.Array,  # [B, T, N, H]
    q_pos: jax.Array,  # [B, T] int32, EMPTY on padding
    k: jax.Array,  # [B, T, K, H] the new tokens' keys
    v: jax.Array,  # [B, T, K, H]
    cache: LayerCache,
    *,
    window: int | None,
    scale: float,
    cap: float | None,
    block: int = BLOCK,
) -> jax.Array:
    """Attention of the new tokens over the cache plus their own keys `k`, `v` (pass none, [B, 0, K, H], when
    they are already stored): [B, T, N, H].

    Query head n reads kv head n // (N / K). Scores, softcap and softmax are float32 whatever the dtype.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    carry = (
        jnp.full(q.shape[:-1], MASKED, jnp.float32),
        jnp.zeros(q.shape[:-1], jnp.float32),
        jnp.zeros(q.shape, jnp.float32),
    )

    def fold(carry, keys, values, k_pos, k_scale=None, v_scale=None):
        return _update(carry, q, keys, values, q_pos, k_pos, window, scale, cap, k_scale, v_scale)

    # The cache, block by block up to the filled bound. A last block that would run past the end is
    # read from size - block instead, and the slots it shares with the block before are masked.
    size = cache.size
    cache_block = min(block, size)

    def cache_step(i, carry):
        start = jnp.minimum(i * cache_block, size - cache_block)
        stored = kv_cache.read(cache, start, cache_block)
        fresh = start + jnp.arange(cache_block) >= i * cache_block  # [S]
        k_pos = jnp.where(fresh, stored.positions, EMPTY)
        return fold(carry, stored.k, stored.v, k_pos, stored.k_scale, stored.v_scale)

    num_blocks = -(-kv_cache.filled_bound(cache, q_pos) // cache_block)
    carry = jax.lax.fori_loop(0, num_blocks, cache_step, carry)

    # The new tokens' own keys, in blocks of the same size (a static count).
    k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # [B, K, H, T], [B, K, T, H]
    for start in range(0, k.shape[-1], block):
        cols = slice(start, start + block)
        carry = fold(carry, k[..., cols], v[:, :, cols], q_pos[:, cols])

    _, l, acc = carry
    out = acc / jnp.where(l == 0, 1.0, l)[..., None]  # an all-masked (padding) query gives zeros
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(v.dtype)
