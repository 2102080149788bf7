"""A bias-free projection named by its einsum, with its logical sharding axes declared beside the weight."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_jax import quant

# HF initialises every projection and the embedding with N(0, 0.02).
INIT = nnx.initializers.normal(stddev=0.02)


class Linear(nnx.Module):
    """y = einsum(spec, x, w); w has shape `shape` and one logical axis name per dimension.

    The weight is stored in `param_dtype` and cast to the compute `dtype` before the matmul, unless
    `fp8.quantize_model` made it an FP8 kernel [out..., in...] with a per-channel `scale` and set `quant`
    to "weight_only" or "w8a8" (see gemma_jax/quant.py).
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
        self.quant: str | None = None

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.quant is not None:
            return quant.fp8_einsum(
                self.spec, x.astype(self.dtype), self.kernel[...], self.scale[...], w8a8=self.quant == "w8a8"
            )
        # Accumulate in float32 (more exact in bfloat16, and XLA's CPU bf16 dot is fast only with an f32 result:
        # a [8, 2304] x [2304, 9216] bf16 matmul took 95 ms with a bf16 result and 7 ms with f32, f32 inputs 13 ms).
        y = jnp.einsum(
            self.spec, x.astype(self.dtype), self.kernel[...].astype(self.dtype), preferred_element_type=jnp.float32
        )
        return y.astype(self.dtype)
