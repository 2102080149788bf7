"""Rotary position embedding, split-half (NeoX / HF `rotate_half`) convention."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_angles(positions: jax.Array, head_dim: int, theta: float, scale: float = 1.0) -> jax.Array:
    """Angles [B, T, H/2] in float32: position * theta^(-2i/H) / scale (scale > 1: linear RoPE scaling)."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim) / scale  # [H/2]
    return positions.astype(jnp.float32)[..., None] * inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, theta: float, scale: float = 1.0) -> jax.Array:
    """Rotate x [B, T, N, H] by its positions [B, T].

    cos/sin are rounded to x's dtype before the multiply, as HF does, so bfloat16 runs round alike.
    """
    angles = rope_angles(positions, x.shape[-1], theta, scale)[:, :, None, :]  # [B, T, 1, H/2]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)  # [B, T, N, H/2] each
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
