"""Grouped-query attention with Gemma-2's score softcap, sliding window and a position-addressed KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_jax import kv_cache
from gemma_jax.config import SLIDING, GemmaConfig
from gemma_jax.linear import Linear
from gemma_jax.norm import RMSNorm
from gemma_jax.rope import apply_rope


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


def dot_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, cap: float | None
) -> jax.Array:
    """softmax(softcap(q k^T * scale)) v with GQA: q [B, T, N, H], k/v [B, S, K, H] -> [B, T, N, H].

    Query head n reads kv head n // (N / K), as HF's `repeat_kv`. Softmax runs in float32.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k) * scale
    scores = softcap(scores, cap).astype(jnp.float32)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)


class Attention(nnx.Module):
    """One layer's self-attention; `kind` (sliding or global) is fixed per layer."""

    def __init__(self, config: GemmaConfig, kind: str, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        d, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q = Linear("BTD,DNH->BTNH", (d, n, h), ("embed", "heads", "head_dim"), **kw)
        self.k = Linear("BTD,DKH->BTKH", (d, k, h), ("embed", "kv_heads", "head_dim"), **kw)
        self.v = Linear("BTD,DKH->BTKH", (d, k, h), ("embed", "kv_heads", "head_dim"), **kw)
        self.o = Linear("BTNH,NHD->BTD", (n, h, d), ("heads", "head_dim", "embed"), **kw)
        self.sliding = kind == SLIDING
        self.window = config.sliding_window if self.sliding else None
        self.scale = config.query_pre_attn_scalar**-0.5
        self.cap = config.attn_logit_softcap
        self.rope_theta, self.rope_scale = config.rope(kind)
        if config.qk_norm:  # Gemma-3: RMSNorm over head_dim on q and k, before RoPE
            norm = dict(eps=config.rms_norm_eps, param_dtype=param_dtype, axis="head_dim")
            self.q_norm, self.k_norm = RMSNorm(h, **norm), RMSNorm(h, **norm)
        else:
            self.q_norm = self.k_norm = None

    def __call__(
        self,
        x: jax.Array,  # [B, T, D]
        positions: jax.Array,  # [B, T] int32, EMPTY on padding
        cache: kv_cache.LayerCache | None,
    ) -> tuple[jax.Array, kv_cache.LayerCache | None]:
        q, k, v = self.q(x), self.k(x), self.v(x)  # [B, T, N, H], [B, T, K, H], [B, T, K, H]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        rope_pos = jnp.maximum(positions, 0)
        q = apply_rope(q, rope_pos, self.rope_theta, self.rope_scale)
        k = apply_rope(k, rope_pos, self.rope_theta, self.rope_scale)
        keys, values, key_pos = k, v, positions
        if cache is not None and x.shape[1] == 1:
            # Decode: store the token, then attend over the cache alone. In a ring the slot it takes
            # held position p - window, which has just left the window: nothing needed is lost.
            cache = kv_cache.write(cache, k, v, positions, ring=self.sliding)
            keys, values, key_pos = cache.k.astype(k.dtype), cache.v.astype(v.dtype), cache.positions  # [B, S, ...]
        elif cache is not None:
            # Prefill: attend over what was cached before this call plus the new tokens, then store
            # them: a chunk longer than the ring still sees all of its own keys.
            keys = jnp.concatenate([cache.k.astype(k.dtype), k], axis=1)  # [B, S+T, K, H]
            values = jnp.concatenate([cache.v.astype(v.dtype), v], axis=1)
            key_pos = jnp.concatenate([cache.positions, positions], axis=1)  # [B, S+T]
            cache = kv_cache.write(cache, k, v, positions, ring=self.sliding)
        mask = attention_mask(positions, key_pos, self.window)  # [B, T, S(+T)]
        out = dot_attention(q, keys, values, mask, self.scale, self.cap)  # [B, T, N, H]
        return self.o(out), cache
