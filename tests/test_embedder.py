"""The tied embedding: in a bfloat16 decode loop the table is read as stored, with no per-call copy of it; float32
logits of a few rows on CPU take a multiply-and-reduce, with the einsums' gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma_jax.embedder import Embedder, few_rows_logits

V, D = 512, 64


def embedder(dtype=jnp.bfloat16) -> Embedder:
    return Embedder(V, D, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))


def test_logits_and_lookup_equal_the_float32_math():
    emb = embedder()
    table = np.asarray(emb.embedding[...], np.float32)
    tokens = jnp.asarray([[3, 7, 511], [0, 1, 2]])
    x = emb.encode(tokens)  # [2, 3, D]
    expected = (table[np.asarray(tokens)] * np.float32(jnp.asarray(D**0.5, jnp.bfloat16))).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(expected, np.float32))
    logits = emb.decode(x)
    assert logits.shape == (2, 3, V) and logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), np.asarray(x, np.float32) @ table.T, rtol=1e-5, atol=1e-4)


def table_copies(lookup, logits) -> dict[str, int]:
    """Instructions of a compiled 4-step greedy loop over a bf16 Embedder (`lookup(emb, tokens)`, then
    `logits(emb, x)`, then the next token) that make a whole float32 table [V, D] or a transposed bf16 table
    [D, V] once per call. The table is an argument of the program, as the weights are in the Sampler's."""
    graphdef, state = nnx.split(embedder())

    @jax.jit
    def loop(state, token):
        emb = nnx.merge(graphdef, state)

        def body(_, token):  # token [B]
            return jnp.argmax(logits(emb, lookup(emb, token[:, None])), -1)[:, 0].astype(jnp.int32)

        return jax.lax.fori_loop(0, 4, body, token)

    text = loop.lower(state, jnp.zeros((2,), jnp.int32)).compile().as_text()
    entry = text.split("\nENTRY", 1)[1]  # what runs once per call; the loop body's fusions are above it
    lines = [line.split("=", 1)[1] for line in entry.splitlines()[1:] if "=" in line]
    return {
        "float32 table": sum(1 for rhs in lines if rhs.strip().startswith(f"f32[{V},{D}]")),
        "transposed table": sum(1 for rhs in lines if rhs.strip().startswith(f"bf16[{D},{V}]")),
    }


def test_bf16_decode_loop_reads_the_table_as_stored_on_cpu():
    """XLA:CPU converts a bf16 table to float32 to gather from it, and lays it out [D, V] for logits of [B, T, D];
    in a loop both are hoisted, a whole copy per call. A plain lookup and a plain einsum (the controls) make
    them; the Embedder makes neither."""
    if jax.default_backend() != "cpu":
        pytest.skip(f"the table copies checked here are XLA:CPU's; this backend is {jax.default_backend()}")

    def plain_lookup(emb, tokens):
        return jnp.take(emb.embedding[...], tokens, axis=0)

    def plain_logits(emb, x):
        return jnp.einsum("BTD,VD->BTV", x, emb.embedding[...], preferred_element_type=jnp.float32)

    assert table_copies(plain_lookup, Embedder.decode)["float32 table"] > 0
    assert table_copies(Embedder.encode, plain_logits)["transposed table"] > 0
    assert table_copies(Embedder.encode, Embedder.decode) == {"float32 table": 0, "transposed table": 0}


@pytest.mark.parametrize("rows", [2, 64])
def test_few_rows_logits_and_gradient_equal_the_einsum(rows):
    kx, kt, kg = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (rows, D), jnp.float32)
    table = jax.random.normal(kt, (V, D), jnp.float32)
    g = jax.random.normal(kg, (rows, V), jnp.float32)
    einsum = lambda x, t: jnp.einsum("ND,VD->NV", x, t, precision="highest")  # noqa: E731
    np.testing.assert_allclose(few_rows_logits(x, table), einsum(x, table), rtol=1e-5, atol=1e-4)
    ours = jax.vjp(few_rows_logits, x, table)[1](g)
    expected = jax.vjp(einsum, x, table)[1](g)
    for a, b in zip(ours, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3)


def test_few_rows_logits_gradient_builds_no_product_tensor():
    """The reduce's own gradient would hold [V, N, D] (4.3 GB here; XLA plans 12.9 GB); the custom one needs about
    the [V, D] result."""
    vocab, rows, dim = 16384, 64, 1024
    table = jax.ShapeDtypeStruct((vocab, dim), jnp.float32)
    x = jax.ShapeDtypeStruct((rows, dim), jnp.float32)
    loss = lambda x, t: jnp.sum(few_rows_logits(x, t) ** 2)  # noqa: E731
    temp = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, table).compile().memory_analysis().temp_size_in_bytes
    assert temp < 4 * vocab * dim * 2


def test_float32_decode_of_a_few_rows_reduces_on_cpu():
    """On XLA:CPU, float32 logits of 2 to 64 rows take the multiply-and-reduce; one row keeps the GEMV (a dot)."""
    if jax.default_backend() != "cpu":
        pytest.skip(f"Embedder.decode reduces few rows on XLA:CPU only; this backend is {jax.default_backend()}")
    emb = embedder(jnp.float32)
    jaxpr = {rows: str(jax.make_jaxpr(emb.decode)(jnp.zeros((rows, 1, D), jnp.float32))) for rows in (1, 8)}
    assert "dot_general" in jaxpr[1] and "custom_vjp_call" not in jaxpr[1]
    assert "dot_general" not in jaxpr[8] and "custom_vjp_call" in jaxpr[8] and "reduce_sum" in jaxpr[8]
