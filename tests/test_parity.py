"""Logits parity with HF transformers' Gemma2ForCausalLM (float32, eager attention): the core oracle."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_logits, hf_model, hf_state_dict, left_padded

import gemma_jax as gj

F32_TOL = 1e-4  # max |logit difference|, float32

CONFIGS = {
    # window 8 < sequence 40: sliding layers really cut keys off
    "window": gj.gemma2_tiny(sliding_window=8),
    # multi-query attention
    "mqa": gj.gemma2_tiny(num_kv_heads=1),
    # heads * head_dim (4 * 32) != hidden (64), as in 9B (16 * 256 != 3584)
    "wide_heads": gj.gemma2_tiny(head_dim=32, query_pre_attn_scalar=32),
    # query_pre_attn_scalar != head_dim, as in 27B (144 vs 128)
    "qpas": gj.gemma2_tiny(query_pre_attn_scalar=24),
    # odd layer count: two scanned (sliding, global) groups plus one unscanned tail layer
    "odd_layers": gj.gemma2_tiny(num_layers=5),
    # no softcaps at all (HF allows None)
    "no_softcap": gj.gemma2_tiny(attn_logit_softcap=None, final_logit_softcap=None),
    # Gemma-3 text: q/k norms, local/global RoPE bases, linear RoPE scaling on global layers,
    # 5:1 pattern (one scanned 6-layer group + a 2-layer tail), window 8 < 40, no softcaps
    "gemma3": gj.gemma3_tiny(),
    "gemma3_mqa_unscaled": gj.gemma3_tiny(num_kv_heads=1, global_rope_scale=1.0, num_layers=12),
}


def ours(config: gj.GemmaConfig, model, dtype=jnp.float32):
    params = gj.from_hf_state_dict(hf_state_dict(model), config)
    return gj.from_params(config, params, dtype=dtype, param_dtype=dtype)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity_float32(name):
    config = CONFIGS[name]
    hf = hf_model(config)
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 40)).astype(np.int32)
    want = hf_logits(hf, tokens)
    got, _ = ours(config, hf)(jnp.asarray(tokens))
    assert np.abs(want).max() > 1.0, "logits too small for the comparison to mean anything"
    np.testing.assert_allclose(np.asarray(got), want, atol=F32_TOL, rtol=0)


def test_parity_left_padded_batch():
    config = CONFIGS["window"]
    hf = hf_model(config, seed=3)
    tokens, mask = left_padded(np.random.default_rng(2), [40, 23, 9], config.vocab_size)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    want = hf_logits(hf, tokens, mask, positions)
    got, _ = ours(config, hf)(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
    got = np.asarray(got)
    np.testing.assert_allclose(got[mask], want[mask], atol=F32_TOL, rtol=0)
    # and each padded row equals the same prompt run alone, unpadded
    model = ours(config, hf)
    for row in range(3):
        alone, _ = model(jnp.asarray(tokens[row][mask[row]])[None])
        np.testing.assert_allclose(got[row][mask[row]], np.asarray(alone)[0], atol=F32_TOL, rtol=0)


# bfloat16 weights and compute vs the float32 oracle: rounding only, so logits stay close and the
# argmax agrees almost everywhere. Measured on this config: max |diff| ~0.3 of logits up to ~30.
BF16_ATOL = 1.0
BF16_TOP1 = 0.9


def test_parity_bfloat16():
    config = CONFIGS["window"]
    hf = hf_model(config, seed=4)
    tokens = np.random.default_rng(5).integers(0, config.vocab_size, (4, 40)).astype(np.int32)
    want = hf_logits(hf, tokens)
    got, _ = ours(config, hf, dtype=jnp.bfloat16)(jnp.asarray(tokens))
    got = np.asarray(got, np.float32)
    assert np.abs(got - want).max() <= BF16_ATOL
    top1 = np.mean(got.argmax(-1) == want.argmax(-1))
    assert top1 >= BF16_TOP1, f"bf16 top-1 agreement {top1:.3f}"


def test_parity_27b_shape_ratios():
    """27B's head layout scaled down: 32 heads of 128 for a 4608 model -> 8 heads of 8 for 72, qpas 72/8=9."""
    config = dataclasses.replace(
        gj.gemma2_tiny(), hidden_size=72, num_heads=8, num_kv_heads=4, head_dim=8, query_pre_attn_scalar=9
    )
    hf = hf_model(config, seed=6)
    tokens = np.random.default_rng(7).integers(0, config.vocab_size, (1, 24)).astype(np.int32)
    got, _ = ours(config, hf)(jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(got), hf_logits(hf, tokens), atol=F32_TOL, rtol=0)
