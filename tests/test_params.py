"""The HF <-> gemma_jax parameter table: exact round trips and named errors."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import gemma_jax as gj
from gemma_jax import params as pm


def random_hf_state(config: gj.GemmaConfig) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {n: rng.standard_normal(pm.hf_shape(n, config)).astype(np.float32) for n in pm.hf_names(config)}


@pytest.mark.parametrize("num_layers", [4, 5])
def test_round_trip_is_exact(num_layers):
    config = gj.gemma2_tiny(num_layers=num_layers, head_dim=32, query_pre_attn_scalar=32)
    hf = random_hf_state(config)
    back = gj.to_hf_state_dict(gj.from_hf_state_dict(hf, config), config)
    assert back.keys() == hf.keys()
    for name in hf:
        np.testing.assert_array_equal(back[name], hf[name], err_msg=name)


def test_layout_matches_model_tree():
    config = gj.gemma2_tiny(num_layers=5)
    ours = gj.from_hf_state_dict(random_hf_state(config), config)
    model_params = gj.params_of(gj.Transformer(config, rngs=nnx.Rngs(0)))
    shapes = lambda tree: {k: shapes(v) if isinstance(v, dict) else tuple(v.shape) for k, v in tree.items()}  # noqa: E731
    assert shapes(ours) == shapes(model_params)


def test_layer_placement():
    config = gj.gemma2_tiny(num_layers=5)  # groups of (sliding, global) x2, tail: 1 sliding layer
    p = pm.placement("model.layers.3.self_attn.q_proj.weight", config)
    assert (p.path, p.stack_index) == (("groups", "layers", 1, "attn", "q", "kernel"), 1)
    p = pm.placement("model.layers.4.mlp.down_proj.weight", config)
    assert (p.path, p.stack_index) == (("tail", "layers", 0, "mlp", "down", "kernel"), None)


def test_q_head_packing_follows_hf_view():
    """HF row h*H + d of q_proj is head h, dim d (the `.view(B, T, N, H)` order)."""
    config = gj.gemma2_tiny()
    hf = random_hf_state(config)
    q = gj.from_hf_state_dict(hf, config)["groups"]["layers"][0]["attn"]["q"]["kernel"][0]  # [D, N, H]
    w = hf["model.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(q[:, 2, 5], w[2 * config.head_dim + 5])


def test_missing_unexpected_and_shape_errors():
    config = gj.gemma2_tiny()
    hf = random_hf_state(config)
    missing = dict(hf)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(gj.ParamMappingError, match=r"missing tensors \[model\.layers\.1\.mlp\.up_proj\.weight\]"):
        gj.from_hf_state_dict(missing, config)
    extra = hf | {"model.layers.9.mlp.up_proj.weight": np.zeros(1)}
    with pytest.raises(gj.ParamMappingError, match=r"unexpected tensors \[model\.layers\.9"):
        gj.from_hf_state_dict(extra, config)
    bad = hf | {"model.norm.weight": np.zeros(3, np.float32)}
    with pytest.raises(gj.ParamMappingError, match=r"shape mismatch for 'model\.norm\.weight': expected \(64,\)"):
        gj.from_hf_state_dict(bad, config)
    # the tied LM head HF sometimes saves is accepted and ignored
    gj.from_hf_state_dict(hf | {"lm_head.weight": hf["model.embed_tokens.weight"]}, config)


def test_from_params_names_bad_tree():
    config = gj.gemma2_tiny()
    params = gj.from_hf_state_dict(random_hf_state(config), config)
    params["final_norm"]["scale"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"params 'final_norm\.scale' has shape \(3,\), expected \(64,\)"):
        gj.from_params(config, params)
