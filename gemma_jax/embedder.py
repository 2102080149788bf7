"""Token embedding, shared with the output projection (tied weights)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_jax.linear import INIT


class Embedder(nnx.Module):
    """encode: E[ids] * sqrt(D); decode: h @ E^T. The sqrt(D) factor is rounded to the compute dtype (as HF)."""

    def __init__(self, vocab_size: int, dim: int, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.scale = dim**0.5
        self.embedding = nnx.Param(INIT(rngs.params(), (vocab_size, dim), param_dtype), logical_axes=("vocab", "embed"))

    def encode(self, tokens: jax.Array) -> jax.Array:
        x = jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)  # [B, T, D]
        return x * jnp.asarray(self.scale, self.dtype)

    def decode(self, x: jax.Array) -> jax.Array:
        # float32 logits, accumulated in float32 whatever the compute dtype (see Linear)
        return jnp.einsum("BTD,VD->BTV", x, self.embedding[...].astype(self.dtype), preferred_element_type=jnp.float32)
