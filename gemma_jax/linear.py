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

    Built outside `quant.projections`, the weight is a float `kernel` stored in `param_dtype` and cast to the
    compute `dtype` before the matmul. Built inside it, the projection is quantized from the start: an 8-bit
    `kernel` [out..., in...] (contracting axes last, logical axes permuted alike) and a float32 `scale` [out...],
    handed to `quant.einsum` as one `QArray`; `quant` is the scheme's mode ("weight_only" or "w8a8"), else None.
    Nothing here changes after construction: gemma_jax.fp8 quantizes a model by building a new one.
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
        w = INIT(rngs.params(), shape, param_dtype)
        scheme = quant.current_scheme()
        self.quant: str | None = None if scheme is None else scheme.mode
        if scheme is None:
            self.kernel = nnx.Param(w, logical_axes=logical_axes)
            self.scale = None
            return
        contracting = tuple(range(len(quant.split_spec(spec)[1])))  # the kernel's leading axes
        q, scale = quant.quantize_kernel(w, contracting, dtype=scheme.dtype)
        out_axes = logical_axes[len(contracting) :]
        self.kernel = nnx.Param(q, logical_axes=out_axes + logical_axes[: len(contracting)])
        self.scale = nnx.Param(scale, logical_axes=out_axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.kernel[...]
        if self.scale is not None:
            w = quant.QArray(w, self.scale[...], w8a8=self.quant == quant.W8A8)
        return quant.einsum(self.spec, x.astype(self.dtype), w)
