"""quant.float_einsum: float32 accumulation, and no float32 copy of a bf16 weight for a one-row matmul on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax import quant

D, F = 64, 96  # small: a one-row matmul converts the weight (below quant.PAD_MIN_SIZE)
D_BIG, F_BIG = 512, 512  # large enough to be read as stored


def converted_weights(fn, x, w) -> int:
    """Instructions of the compiled `fn(x, w)` that produce the weight in float32."""
    text = jax.jit(fn).lower(x, w).compile().as_text()
    return sum(1 for line in text.splitlines() if f"= f32[{w.shape[0]},{w.shape[1]}]" in line)


def one_row_converts(d: int, f: int) -> tuple[int, int]:
    """Weight converts of a plain one-row bf16 einsum (the control) and of float_einsum, [1, 1, d] x [d, f]."""
    if jax.default_backend() != "cpu":
        pytest.skip(f"float_einsum pads one-row matmuls on XLA:CPU only; this backend is {jax.default_backend()}")
    x = jax.ShapeDtypeStruct((1, 1, d), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((d, f), jnp.bfloat16)
    plain = lambda x, w: jnp.einsum("BTD,DF->BTF", x, w, preferred_element_type=jnp.float32)  # noqa: E731
    return converted_weights(plain, x, w), converted_weights(lambda x, w: quant.float_einsum("BTD,DF->BTF", x, w), x, w)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("shape", [(D, F), (D_BIG, F_BIG)])
def test_float_einsum_equals_a_float32_einsum(rows, shape):
    d, f = shape
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (rows, 1, d), jnp.bfloat16)
    w = jax.random.normal(kw, (d, f), jnp.bfloat16)
    y = quant.float_einsum("BTD,DF->BTF", x, w)
    assert y.shape == (rows, 1, f) and y.dtype == jnp.float32
    expected = jnp.einsum("BTD,DF->BTF", x.astype(jnp.float32), w.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-5, atol=1e-4)


def test_one_bf16_row_reads_a_large_weight_as_stored_on_cpu():
    """A plain one-row bf16 einsum converts the whole weight to float32 on XLA:CPU (the control); the padded
    one does not."""
    assert D_BIG * F_BIG >= quant.PAD_MIN_SIZE
    plain, ours = one_row_converts(D_BIG, F_BIG)
    assert plain > 0 and ours == 0


def test_one_bf16_row_converts_a_small_weight_on_cpu():
    """Below PAD_MIN_SIZE the weight takes the float32 path, as in a plain einsum (no pad to pay for)."""
    assert D * F < quant.PAD_MIN_SIZE
    plain, ours = one_row_converts(D, F)
    assert plain > 0 and ours > 0
