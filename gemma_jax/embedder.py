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
            if table.dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
                # XLA:CPU gathers bfloat16 rows from a float32 copy of the table; in a decode loop that convert is
                # loop-invariant and hoisted, a float32 table per call (2b shape: 0.8 s). Tied to the tokens by a
                # barrier, the table is not invariant, and only the gathered rows are converted.
                table, tokens = jax.lax.optimization_barrier((table, tokens))
            x = jnp.take(table, tokens, axis=0).astype(self.dtype)
        return x * jnp.asarray(self.multiplier, self.dtype)

    def decode(self, x: jax.Array) -> jax.Array:
        """float32 logits [B, T, V], accumulated in float32 whatever the compute dtype (see Linear).

        The rows are flattened to [B*T, D] first: with two free axes on x, XLA:CPU lays the bf16 table out
        transposed, a [D, V] copy per call (2b shape: 0.6 s, and the GEMM on it was slower than on [V, D]).
        """
        table = self._table()
        rows = x.reshape(-1, x.shape[-1])  # [N, D]
        if isinstance(table, quant.QArray):  # the table [V, D] is the quantized layout [O, K] of "ND,DV->NV"
            logits = quant.einsum("ND,DV->NV", rows, table, out_dtype=jnp.float32)
        elif rows.dtype == table.dtype == jnp.float32 and 2 <= rows.shape[0] <= 64 and jax.default_backend() == "cpu":
            logits = few_rows_logits(rows, table)
        else:
            logits = quant.float_einsum("ND,VD->NV", rows, table.astype(self.dtype))
        return logits.reshape(*x.shape[:-1], -1)


@jax.custom_vjp
def few_rows_logits(rows: jax.Array, table: jax.Array) -> jax.Array:
    """rows [N, D] x table [V, D] -> [N, V], as a multiply-and-reduce over D: the logits of a float32 decode step
    on XLA:CPU, where N (the batch) is 2 to 64.

    There XLA's GEMM packs the whole table into panels on every call, for a handful of rows: a fused reduce reads
    each table row once for all N. Measured, a float32 step of the 2b table (256000 x 2304): 8 rows 126 ms
    against 189 ms, 64 rows 443 against 522; the 270M table at 4 rows 34 against 49 ms. At one row XLA's GEMV is
    the fast one (and this form is not), so a single row keeps the einsum. The gradient is the usual einsums: the
    reduce's own would build [V, N, D].
    """
    return jnp.sum(table[:, None, :] * rows[None, :, :], axis=-1).T  # [V, N, D] -> [V, N] -> [N, V], fused


def _few_rows_logits_fwd(rows, table):
    return few_rows_logits(rows, table), (rows, table)


def _few_rows_logits_bwd(residuals, g):  # g [N, V]
    rows, table = residuals
    return jnp.einsum("NV,VD->ND", g, table), jnp.einsum("NV,ND->VD", g, rows)


few_rows_logits.defvjp(_few_rows_logits_fwd, _few_rows_logits_bwd)
