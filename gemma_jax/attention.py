"""Grouped-query attention (Gemma 2 and 3): score softcap, sliding window, q/k norms, a position-addressed cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_jax import blockwise, kv_cache, pallas_decode
from gemma_jax.blockwise import attention_mask, softcap
from gemma_jax.config import SLIDING, GemmaConfig
from gemma_jax.linear import Linear
from gemma_jax.norm import RMSNorm
from gemma_jax.rope import apply_rope


def dot_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, cap: float | None
) -> jax.Array:
    """softmax(softcap(q k^T * scale)) v with GQA: q [B, T, N, H], k/v [B, S, K, H] -> [B, T, N, H].

    Query head n reads kv head n // (N / K), as HF's `repeat_kv`. Softmax runs in float32.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
    scores = softcap(scores, cap)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)
    return out.reshape(b, t, n, h)


def _one_token(kernel: pallas_decode.Kernel):
    """A Pallas decode kernel (one query per row, every key already in the cache) in blockwise.attend's form."""

    def attend(q, q_pos, k, v, cache, **kw):  # k, v: none left, the new token is stored
        return kernel(q[:, 0], q_pos[:, 0], cache, **kw)[:, None]

    return attend


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
        if cache is None:  # training and plain forwards: dense over the sequence itself
            out = dot_attention(q, k, v, attention_mask(positions, positions, self.window), self.scale, self.cap)
            return self.o(out), None
        # With a cache. A global layer stores the new tokens first and attends over the cache alone: a
        # loop that reads a buffer written after it makes XLA copy the whole buffer (per layer, per step).
        # A ring (sliding layer) prefill chunk must read first: storing a chunk can overwrite keys that
        # its own earlier queries still see; copying a ring costs its window, not the capacity. In a
        # ring, a decode token's slot held position p - window, which has just left the window.
        decode = x.shape[1] == 1
        if not self.sliding or decode:
            cache = kv_cache.write(cache, k, v, positions, ring=self.sliding)
            k, v = k[:, :0], v[:, :0]  # already in the cache
        # A decode step on GPU/TPU runs the backend's Pallas kernel (each row reads its own fill); else blockwise.
        kernel = pallas_decode.backend_kernel(jax.default_backend(), cache.size) if decode else None
        attend = blockwise.attend if kernel is None else _one_token(kernel)
        out = attend(q, positions, k, v, cache, window=self.window, scale=self.scale, cap=self.cap)
        if k.shape[1]:
            cache = kv_cache.write(cache, k, v, positions, ring=self.sliding)
        return self.o(out), cache  # out [B, T, N, H]
