"""RMSNorm with Gemma's zero-centred scale: y = x / rms(x) * (1 + w), computed in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """Normalise over the last axis; the (1 + w) multiply happens in float32 before the downcast (as HF)."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


class RMSNorm(nnx.Module):
    """Learned per-channel scale, stored as an offset from 1 (zero-initialised), exactly as in HF checkpoints."""

    def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype, axis: str = "embed"):
        self.eps = eps
        self.scale = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=(axis,))  # [D] (or [H] for q/k norms)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)
