"""Config: released presets equal HF's Gemma2Config, HF round trips, and named validation errors."""

from __future__ import annotations

import dataclasses
import json

import pytest

import gemma_jax as gj
from gemma_jax.config import ConfigError

# config.json of the released checkpoints (google/gemma-2-{2b,9b,27b}; -it and SPPO share them)
RELEASED = {
    "gemma2_2b": dict(
        hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
    ),
    "gemma2_9b": dict(
        hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
    ),
    "gemma2_27b": dict(
        hidden_size=4608, intermediate_size=36864, num_hidden_layers=46, num_attention_heads=32,
        num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=144,
    ),
}  # fmt: skip
COMMON = dict(
    model_type="gemma2",
    architectures=["Gemma2ForCausalLM"],
    vocab_size=256000,
    sliding_window=4096,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    rope_theta=10000.0,
    rms_norm_eps=1e-06,
    hidden_activation="gelu_pytorch_tanh",
    hidden_act="gelu_pytorch_tanh",
    max_position_embeddings=8192,
    attention_bias=False,
    attention_dropout=0.0,
    tie_word_embeddings=True,
    cache_implementation="hybrid",
    torch_dtype="float32",
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_presets_equal_released_hf_config(name):
    transformers = pytest.importorskip("transformers")
    hf = transformers.Gemma2Config(**COMMON, **RELEASED[name])
    assert gj.GemmaConfig.from_hf(hf.to_dict()) == gj.preset(name)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_config_json_loads(name, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(COMMON | RELEASED[name]))
    assert gj.GemmaConfig.from_hf(tmp_path) == gj.preset(name)
    assert gj.GemmaConfig.from_hf(tmp_path / "config.json") == gj.preset(name)


@pytest.mark.parametrize("name", ["gemma2_2b", "gemma2_9b", "gemma2_27b", "gemma2_tiny"])
def test_to_hf_round_trip(name):
    config = gj.preset(name)
    assert gj.GemmaConfig.from_hf(gj.preset(name).to_hf()) == config
    odd = dataclasses.replace(config, num_layers=config.num_layers + 1)
    assert gj.GemmaConfig.from_hf(odd.to_hf()) == odd


def test_to_hf_is_accepted_by_transformers():
    transformers = pytest.importorskip("transformers")
    config = gj.gemma2_tiny(num_layers=3)
    hf = transformers.Gemma2Config(**config.to_hf())
    assert hf.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert hf.query_pre_attn_scalar == config.query_pre_attn_scalar


def test_9b_qpas_is_head_dim_and_27b_is_d_over_n():
    assert gj.gemma2_9b().query_pre_attn_scalar == 256
    assert gj.gemma2_27b().query_pre_attn_scalar == 4608 // 32


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(num_heads=6, num_kv_heads=4), "num_heads .6. must be divisible by num_kv_heads .4."),
        (dict(sliding_window=0), "sliding_window must be a positive integer"),
        (dict(sliding_window=-5), "sliding_window must be a positive integer"),
        (dict(hidden_size=0), "hidden_size must be a positive integer"),
        (dict(head_dim=15), "head_dim must be even"),
        (dict(attn_logit_softcap=0.0), "attn_logit_softcap must be positive or None"),
        (dict(layer_pattern=("sliding", "local")), "layer_pattern must be"),
        (dict(model_type="llama"), "model_type 'llama' is not supported"),
    ],
)
def test_bad_config_raises_named_error(change, message):
    with pytest.raises(ConfigError, match=message):
        gj.gemma2_tiny(**change)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(model_type="llama"), "model_type 'llama' is not supported"),
        (dict(num_attention_heads=6), "must be divisible by num_kv_heads"),
        (dict(sliding_window=0), "sliding_window must be a positive integer"),
        (dict(hidden_activation="silu"), "hidden_activation 'silu' is not supported"),
        (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_type 'linear' is not supported"),
        (dict(layer_types=["full_attention"] * 3), "layer_types has 3 entries"),
    ],
)
def test_bad_hf_config_raises_named_error(change, message):
    hf = COMMON | RELEASED["gemma2_2b"] | change
    with pytest.raises(ConfigError, match=message):
        gj.GemmaConfig.from_hf(hf)


def test_missing_hf_key_and_file(tmp_path):
    hf = dict(COMMON | RELEASED["gemma2_2b"])
    del hf["hidden_size"]
    with pytest.raises(ConfigError, match=r"missing required keys \['hidden_size'\]"):
        gj.GemmaConfig.from_hf(hf)
    with pytest.raises(ConfigError, match=r"no config\.json"):
        gj.GemmaConfig.from_hf(tmp_path)


def test_unknown_preset_lists_names():
    with pytest.raises(ConfigError, match="gemma2_9b"):
        gj.preset("gemma2_7b")


def test_layer_types():
    assert gj.gemma2_tiny(num_layers=5).layer_types == ("sliding", "global") * 2 + ("sliding",)
    all_global = gj.GemmaConfig.from_hf(COMMON | RELEASED["gemma2_2b"] | dict(layer_types=["full_attention"] * 26))
    assert all_global.layer_pattern == ("global",)


# google/gemma-3-270m config.json as published (flat RoPE keys, layer_types spelled out)
GEMMA3_270M_JSON = dict(
    architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", vocab_size=262144, hidden_size=640,
    intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
    query_pre_attn_scalar=256, sliding_window=512, attn_logit_softcapping=None, final_logit_softcapping=None,
    rope_theta=1000000.0, rope_local_base_freq=10000.0, rope_scaling=None, rms_norm_eps=1e-06,
    hidden_activation="gelu_pytorch_tanh", max_position_embeddings=32768, use_bidirectional_attention=False,
    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3, torch_dtype="bfloat16",
)  # fmt: skip


def test_gemma3_270m_config_json():
    config = gj.GemmaConfig.from_hf(GEMMA3_270M_JSON)
    assert config == gj.gemma3_270m()
    assert config.layer_pattern == ("sliding",) * 5 + ("global",) and config.num_groups == 3
    assert config.rope("sliding") == (10_000.0, 1.0) and config.rope("global") == (1_000_000.0, 1.0)


@pytest.mark.parametrize("name", ["gemma3_270m", "gemma3_1b", "gemma3_4b", "gemma3_12b", "gemma3_27b", "gemma3_tiny"])
def test_gemma3_round_trips_through_transformers(name):
    transformers = pytest.importorskip("transformers")
    config = gj.preset(name)
    assert gj.GemmaConfig.from_hf(config.to_hf()) == config
    hf = transformers.Gemma3TextConfig(**config.to_hf())
    assert gj.GemmaConfig.from_hf(hf.to_dict()) == config


def test_gemma3_multimodal_config_uses_text_config():
    text = {k: v for k, v in gj.gemma3_4b().to_hf().items() if k != "model_type"}
    assert gj.GemmaConfig.from_hf({"model_type": "gemma3", "text_config": text}) == gj.gemma3_4b()


def test_gemma3_older_config_with_period_only():
    old = {k: v for k, v in GEMMA3_270M_JSON.items() if k != "layer_types"} | {"sliding_window_pattern": 6}
    assert gj.GemmaConfig.from_hf(old) == gj.gemma3_270m()
