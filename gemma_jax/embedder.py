"""Token embedding, shared with the output projection (tied weights); int8 per vocab row in int8 models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_jax import quant
from gemma_jax.linear import INIT


class Embedder(nnx.Module):
    """encode: E[ids] * sqrt(D); decode: h @ E^T. The sqrt(D) factor is rounded to the compute dtype (as HF).

    Built inside `quant.projections` with an int8 scheme, the table is stored int8 with a float32 scale per
    vocab row (`embedding` [V, D] int8, `scale` [V]; `quant.Scheme.quantize_embedding` says why only int8):
    a lookup dequantizes the gathered rows only, and the tied logits matmul reads the int8 table (upcast inside
    the matmul, weight-only) with each row's scale multiplying its logit. Otherwise the table is float, as stored.
    """

    def __init__(self, vocab_size: int, dim: int, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.multiplier = dim**0.5
        table = INIT(rngs.params(), (vocab_size, dim), param_dtype)
        scheme = quant.current_scheme()
        if scheme is None or not scheme.quantize_embedding:
            self.embedding = nnx.Param(table, logical_axes=("vocab", "embed"))
            self.scale = None
            return
        q = quant.quantize(table, 1, scheme.dtype)  # one scale per vocab row: its logit's output channel
        self.embedding = nnx.Param(q.values, logical_axes=("vocab", "embed"))
        self.scale = nnx.Param(q.scale, logical_axes=("vocab",))

    def _table(self) -> jax.Array | quant.QArray:
        return self.embedding[...] if self.scale is None else quant.QArray(self.embedding[...], self.scale[...])

    def encode(self, tokens: jax.Array) -> jax.Array:
        table = self._table()
        if isinstance(table, quant.QArray):
            x = table.take(tokens, self.dtype)  # [B, T, D]: only the gathered rows are dequantized
        else:
            x = jnp.take(table, tokens, axis=0).astype(self.dtype)
        return x * jnp.asarray(self.multiplier, self.dtype)

    def decode(self, x: jax.Array) -> jax.Array:
        # float32 logits, accumulated in float32 whatever the compute dtype (see Linear)
        table = self._table()
        if isinstance(table, quant.QArray):  # the table [V, D] is the quantized layout [O, K] of "BTD,DV->BTV"
            return quant.einsum("BTD,DV->BTV", x, table, out_dtype=jnp.float32)
        return quant.float_einsum("BTD,VD->BTV", x, table.astype(self.dtype))
