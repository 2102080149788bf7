"""Gated feed-forward: down( gelu_tanh(x @ gate) * (x @ up) )."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_jax.linear import Linear


class MLP(nnx.Module):
    """Gemma's GeGLU MLP; gelu is the tanh approximation (HF `gelu_pytorch_tanh`)."""

    def __init__(self, dim: int, hidden: int, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = Linear("BTD,DF->BTF", (dim, hidden), ("embed", "mlp"), **kw)
        self.up = Linear("BTD,DF->BTF", (dim, hidden), ("embed", "mlp"), **kw)
        self.down = Linear("BTF,FD->BTD", (hidden, dim), ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.gelu(self.gate(x), approximate=True) * self.up(x)  # [B, T, F]
        return self.down(h)  # [B, T, D]
