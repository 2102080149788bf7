"""Decoder layer with the sandwich norms of Gemma 2 and 3, and a group of layers (one period of the layer pattern)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_jax.attention import Attention
from gemma_jax.config import GemmaConfig
from gemma_jax.kv_cache import LayerCache
from gemma_jax.mlp import MLP
from gemma_jax.norm import RMSNorm
from gemma_jax.partitioning import RESIDUAL, constrain


class Block(nnx.Module):
    """x + post_norm(attn(pre_norm(x))), then x + post_norm(mlp(pre_norm(x)))."""

    def __init__(self, config: GemmaConfig, kind: str, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        d, eps = config.hidden_size, config.rms_norm_eps
        self.pre_attn_norm = RMSNorm(d, eps=eps, param_dtype=param_dtype)
        self.attn = Attention(config, kind, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attn_norm = RMSNorm(d, eps=eps, param_dtype=param_dtype)
        self.pre_ffw_norm = RMSNorm(d, eps=eps, param_dtype=param_dtype)
        self.mlp = MLP(d, config.intermediate_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_ffw_norm = RMSNorm(d, eps=eps, param_dtype=param_dtype)

    def __call__(
        self, x: jax.Array, positions: jax.Array, cache: LayerCache | None
    ) -> tuple[jax.Array, LayerCache | None]:
        x = constrain(x, RESIDUAL)  # [B, T, D], sharded as the mesh's rules say (no-op without a mesh)
        a, cache = self.attn(self.pre_attn_norm(x), positions, cache)
        x = x + self.post_attn_norm(a)
        x = x + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(x)))
        return constrain(x, RESIDUAL), cache


class LayerGroup(nnx.Module):
    """Consecutive layers of the given kinds; the model scans a stack of identical groups."""

    def __init__(
        self,
        config: GemmaConfig,
        kinds: tuple[str, ...],
        *,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.layers = nnx.List([Block(config, kind, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for kind in kinds])

    def __call__(
        self, x: jax.Array, positions: jax.Array, caches: tuple[LayerCache, ...] | None
    ) -> tuple[jax.Array, tuple[LayerCache, ...] | None]:
        new_caches = []
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"layer_{i}"):
                x, c = layer(x, positions, None if caches is None else caches[i])
            new_caches.append(c)
        return x, None if caches is None else tuple(new_caches)
