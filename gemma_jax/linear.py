"""A bias-free projection named by its einsum, with its logical sharding axes declared beside the weight."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# HF initialises every projection and the embedding with N(0, 0.02).
INIT = nnx.initializers.normal(stddev=0.02)


class Linear(nnx.Module):
    """y = einsum(spec, x, w); w has shape `shape` and one logical axis name per dimension.

    The weight is stored in `param_dtype` and cast to the compute `dtype` before the matmul.
    """

    def __init__(
        self,
        spec: str,
        shape: tuple[int, ...],
        logical_axes: tuple[str, ...],
        *,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.spec = spec
        self.dtype = dtype
        self.kernel = nnx.Param(INIT(rngs.params(), shape, param_dtype), logical_axes=logical_axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.einsum(self.spec, x.astype(self.dtype), self.kernel[...].astype(self.dtype))
