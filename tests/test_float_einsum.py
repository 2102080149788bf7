"""quant.float_einsum: float32 accumulation, and no float32 copy of a bf16 weight for a one-row matmul on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax import quant

D, F = 64, 96


def converted_weights(fn, x, w) -> int:
    """Instructions of the compiled `fn(x, w)` that produce the [D, F] weight in float32."""
    text = jax.jit(fn).lower(x, w).compile().as_text()
    return sum(1 for line in text.splitlines() if f"= f32[{D},{F}]" in line)


@pytest.mark.parametrize("rows", [1, 3])
def test_float_einsum_equals_a_float32_einsum(rows):
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (rows, 1, D), jnp.bfloat16)
    w = jax.random.normal(kw, (D, F), jnp.bfloat16)
    y = quant.float_einsum("BTD,DF->BTF", x, w)
    assert y.shape == (rows, 1, F) and y.dtype == jnp.float32
    expected = jnp.einsum("BTD,DF->BTF", x.astype(jnp.float32), w.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_one_bf16_row_reads_the_weight_as_stored_on_cpu():
    """A plain one-row bf16 einsum converts the whole weight to float32 on XLA:CPU (the control); the padded
    one does not."""
    if jax.default_backend() != "cpu":
        pytest.skip(f"float_einsum pads one-row matmuls on XLA:CPU only; this backend is {jax.default_backend()}")
    x = jax.ShapeDtypeStruct((1, 1, D), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((D, F), jnp.bfloat16)
    plain = lambda x, w: jnp.einsum("BTD,DF->BTF", x, w, preferred_element_type=jnp.float32)  # noqa: E731
    assert converted_weights(plain, x, w) > 0
    assert converted_weights(lambda x, w: quant.float_einsum("BTD,DF->BTF", x, w), x, w) == 0
