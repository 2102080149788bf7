"""Architecture config: one frozen dataclass, the released Gemma-2 / Gemma-3 text presets, HF config.json in and out.

Everything the forward pass needs to know about the architecture lives here; dtypes, meshes and
cache sizes are run-time choices and live elsewhere. Validation happens at construction so a bad
config fails with a named error, never with an XLA shape error later.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

SLIDING = "sliding"
GLOBAL = "global"
_HF_LAYER_TYPE = {SLIDING: "sliding_attention", GLOBAL: "full_attention"}
_FROM_HF_LAYER_TYPE = {v: k for k, v in _HF_LAYER_TYPE.items()}

GEMMA2 = "gemma2"
GEMMA3 = "gemma3_text"
SUPPORTED_MODEL_TYPES = (GEMMA2, GEMMA3)
_HF_ARCHITECTURE = {GEMMA2: "Gemma2ForCausalLM", GEMMA3: "Gemma3ForCausalLM"}


class ConfigError(ValueError):
    """A config value is invalid or cannot be represented; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True, slots=True)
class GemmaConfig:
    """Gemma hyperparameters, named as in the paper/DeepMind code, mapped 1:1 to HF config.json.

    Gemma-2 is the default; Gemma-3 text models are the same network with options switched on:
    RMSNorm on q and k (`qk_norm`), a separate RoPE base for sliding layers (`local_rope_theta`),
    linear RoPE scaling on global layers (`global_rope_scale`), a 5:1 layer pattern, no softcaps.

    Shape letters used across the package: V vocab, D hidden, F intermediate, N query heads,
    K kv heads, H head_dim, L layers.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    query_pre_attn_scalar: float
    sliding_window: int = 4096
    attn_logit_softcap: float | None = 50.0
    final_logit_softcap: float | None = 30.0
    rope_theta: float = 10_000.0
    rms_norm_eps: float = 1e-6
    # Attention kind of layer i is layer_pattern[i % len(layer_pattern)]; Gemma-2 alternates
    # sliding (even i) and global (odd i). Layers are scanned in groups of one pattern period.
    layer_pattern: tuple[str, ...] = (SLIDING, GLOBAL)
    max_position_embeddings: int = 8192
    model_type: str = GEMMA2
    qk_norm: bool = False
    local_rope_theta: float | None = None  # RoPE base of sliding layers; None = rope_theta
    global_rope_scale: float = 1.0  # linear RoPE scaling factor of global layers (positions / scale)

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def layer_types(self) -> tuple[str, ...]:
        """Attention kind of every layer, in order."""
        p = self.layer_pattern
        return tuple(p[i % len(p)] for i in range(self.num_layers))

    @property
    def num_groups(self) -> int:
        """Number of whole pattern periods; these are stacked and scanned."""
        return self.num_layers // len(self.layer_pattern)

    @property
    def num_tail_layers(self) -> int:
        """Layers after the last whole period (a prefix of the pattern), applied unscanned."""
        return self.num_layers % len(self.layer_pattern)

    def rope(self, kind: str) -> tuple[float, float]:
        """(theta, linear scale) of the rotary embedding used by layers of this kind."""
        if kind == SLIDING:
            return (self.rope_theta if self.local_rope_theta is None else self.local_rope_theta), 1.0
        return self.rope_theta, self.global_rope_scale

    def to_hf(self) -> dict[str, Any]:
        """The HF config.json dict (`Gemma2Config` / `Gemma3TextConfig`) for this architecture."""
        hf = {
            "architectures": [_HF_ARCHITECTURE[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "sliding_window": self.sliding_window,
            "attn_logit_softcapping": self.attn_logit_softcap,
            "final_logit_softcapping": self.final_logit_softcap,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "layer_types": [_HF_LAYER_TYPE[t] for t in self.layer_types],
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_activation": "gelu_pytorch_tanh",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": True,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "bos_token_id": 2,
        }
        if self.model_type == GEMMA3:
            hf["rope_local_base_freq"] = self.rope(SLIDING)[0]
            if self.global_rope_scale != 1.0:
                hf["rope_scaling"] = {"rope_type": "linear", "factor": self.global_rope_scale}
        return hf

    @classmethod
    def from_hf(cls, source: Mapping[str, Any] | str | os.PathLike) -> GemmaConfig:
        """Build from an HF config dict, a config.json path, or a checkpoint directory holding one."""
        hf = _load_hf_dict(source)
        if hf.get("model_type") == "gemma3" and isinstance(hf.get("text_config"), Mapping):
            hf = {"model_type": GEMMA3, **hf["text_config"]}  # multimodal Gemma 3: its language model
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES} "
                "(is this a Gemma-2 or Gemma-3 checkpoint?)"
            )
        _check_hf_fixed_choices(hf)
        gemma3 = model_type == GEMMA3
        missing = [k for k in _HF_REQUIRED if k not in hf]
        if missing:
            raise ConfigError(f"HF config is missing required keys {missing}")
        num_layers = hf["num_hidden_layers"]
        layer_types = hf.get("layer_types")
        if layer_types is None and gemma3:  # older Gemma-3 configs give the period only
            period = hf.get("sliding_window_pattern", 6)
            layer_types = [_HF_LAYER_TYPE[GLOBAL if (i + 1) % period == 0 else SLIDING] for i in range(num_layers)]
        pattern = _pattern_from_layer_types(layer_types, num_layers)
        global_rope, local_rope = _hf_rope(hf, gemma3)
        heads = hf["num_attention_heads"]
        if not isinstance(heads, int) or isinstance(heads, bool) or heads <= 0:  # before it divides hidden_size
            raise ConfigError(f"num_attention_heads must be a positive integer, got {heads!r}")
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads", heads),
            head_dim=head_dim,
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar", head_dim),
            sliding_window=hf.get("sliding_window", 4096),
            attn_logit_softcap=hf.get("attn_logit_softcapping", None if gemma3 else 50.0),
            final_logit_softcap=hf.get("final_logit_softcapping", None if gemma3 else 30.0),
            rope_theta=float(global_rope.get("rope_theta", 1_000_000.0 if gemma3 else 10_000.0)),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            layer_pattern=pattern,
            max_position_embeddings=hf.get("max_position_embeddings", 8192),
            model_type=model_type,
            qk_norm=gemma3,
            local_rope_theta=float(local_rope["rope_theta"]) if gemma3 else None,
            global_rope_scale=float(global_rope.get("factor", 1.0)),
        )


_HF_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


def _load_hf_dict(source: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"no config.json at {path!r}: pass an HF checkpoint directory or its config.json")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path!r} is not valid JSON: {e}") from e


def _check_hf_fixed_choices(hf: Mapping[str, Any]) -> None:
    """Reject HF options that released Gemma models never use and this model does not implement."""
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise ConfigError(f"hidden_activation {act!r} is not supported; Gemma uses 'gelu_pytorch_tanh'")
    if hf.get("attention_bias", False):
        raise ConfigError("attention_bias=True is not supported; Gemma projections have no bias")
    if not hf.get("tie_word_embeddings", True):
        raise ConfigError("tie_word_embeddings=False is not supported; Gemma ties the LM head to the embedding")
    if hf.get("use_bidirectional_attention"):
        raise ConfigError("use_bidirectional_attention=True (embedding models) is not supported; Gemma LMs are causal")


def _hf_rope(hf: Mapping[str, Any], gemma3: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """RoPE settings of (global, sliding) layers from either config.json form.

    Hub files use flat keys (`rope_theta`, Gemma-3's `rope_local_base_freq` and `rope_scaling`);
    transformers 5 writes `rope_parameters`, per layer type for Gemma-3.
    """
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params:
        global_rope, local_rope = dict(params["full_attention"]), dict(params.get("sliding_attention") or {})
    else:
        global_rope = dict(params) | dict(hf.get("rope_scaling") or {})
        if hf.get("rope_theta") is not None:
            global_rope["rope_theta"] = hf["rope_theta"]
        local_rope = {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)} if gemma3 else dict(global_rope)
    local_rope.setdefault("rope_theta", 10_000.0)
    allowed = ("default", "linear") if gemma3 else ("default",)
    for rope in (global_rope, local_rope):
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in allowed:
            raise ConfigError(f"rope_type {rope_type!r} is not supported; implemented: {allowed}")
    if local_rope.get("rope_type", "default") != "default":
        raise ConfigError("RoPE scaling on sliding-window layers is not supported")
    return global_rope, local_rope


def _pattern_from_layer_types(layer_types: list[str] | None, num_layers: int) -> tuple[str, ...]:
    """Shortest period that reproduces HF's per-layer `layer_types` list."""
    if layer_types is None:
        return (SLIDING, GLOBAL)
    if len(layer_types) != num_layers:
        raise ConfigError(f"layer_types has {len(layer_types)} entries but num_hidden_layers is {num_layers}")
    unknown = sorted(set(layer_types) - set(_FROM_HF_LAYER_TYPE))
    if unknown:
        raise ConfigError(f"unknown layer_types {unknown}; expected {sorted(_FROM_HF_LAYER_TYPE)}")
    kinds = [_FROM_HF_LAYER_TYPE[t] for t in layer_types]
    for period in range(1, num_layers + 1):
        if all(kinds[i] == kinds[i % period] for i in range(num_layers)):
            return tuple(kinds[:period])
    raise AssertionError("unreachable: the full list is always its own period")


def _validate(c: GemmaConfig) -> None:
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "max_position_embeddings",
    ):
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if c.num_heads % c.num_kv_heads:
        raise ConfigError(
            f"num_heads ({c.num_heads}) must be divisible by num_kv_heads ({c.num_kv_heads}): "
            "each kv head serves an equal group of query heads"
        )
    if c.head_dim % 2:
        raise ConfigError(f"head_dim must be even for rotary embeddings, got {c.head_dim}")
    if not isinstance(c.sliding_window, int) or c.sliding_window <= 0:
        raise ConfigError(f"sliding_window must be a positive integer, got {c.sliding_window!r}")
    for name in ("query_pre_attn_scalar", "rope_theta", "rms_norm_eps", "global_rope_scale"):
        if not getattr(c, name) > 0:
            raise ConfigError(f"{name} must be positive, got {getattr(c, name)!r}")
    for name in ("attn_logit_softcap", "final_logit_softcap"):
        value = getattr(c, name)
        if value is not None and not value > 0:
            raise ConfigError(f"{name} must be positive or None (no softcap), got {value!r}")
    if not c.layer_pattern or any(k not in (SLIDING, GLOBAL) for k in c.layer_pattern):
        raise ConfigError(f"layer_pattern must be a non-empty tuple of {SLIDING!r}/{GLOBAL!r}, got {c.layer_pattern!r}")
    if c.local_rope_theta is not None and not c.local_rope_theta > 0:
        raise ConfigError(f"local_rope_theta must be positive or None, got {c.local_rope_theta!r}")
    if c.model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model_type {c.model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}")


# Released configs (config.json of google/gemma-2-{2b,9b,27b}; the -it and SPPO variants share them).
def gemma2_2b() -> GemmaConfig:
    return GemmaConfig(
        vocab_size=256_000,
        hidden_size=2304,
        intermediate_size=9216,
        num_layers=26,
        num_heads=8,
        num_kv_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
    )


def gemma2_9b() -> GemmaConfig:
    return GemmaConfig(
        vocab_size=256_000,
        hidden_size=3584,
        intermediate_size=14336,
        num_layers=42,
        num_heads=16,
        num_kv_heads=8,
        head_dim=256,
        query_pre_attn_scalar=256,
    )


def gemma2_27b() -> GemmaConfig:
    return GemmaConfig(
        vocab_size=256_000,
        hidden_size=4608,
        intermediate_size=36864,
        num_layers=46,
        num_heads=32,
        num_kv_heads=16,
        head_dim=128,
        query_pre_attn_scalar=144,
    )


# Sizes of the tiny test models: every code path of the big ones, milliseconds to run.
_TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window=8,
)


def gemma2_tiny(**overrides: Any) -> GemmaConfig:
    """Gemma-2 on the tiny sizes: 4 layers = two scanned (sliding, global) groups."""
    return GemmaConfig(**(_TINY | dict(num_layers=4) | overrides))


# Released Gemma-3 text configs (google/gemma-3-{270m,1b} are text-only; 4b+ are the language model of
# the multimodal checkpoints). Five sliding layers, then one global; no softcaps; q/k RMSNorm.
def _gemma3(**sizes: Any) -> GemmaConfig:
    base = dict(
        num_heads=4,
        num_kv_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=1024,
        attn_logit_softcap=None,
        final_logit_softcap=None,
        rope_theta=1_000_000.0,
        local_rope_theta=10_000.0,
        global_rope_scale=8.0,
        layer_pattern=(SLIDING,) * 5 + (GLOBAL,),
        max_position_embeddings=131_072,
        model_type=GEMMA3,
        qk_norm=True,
        vocab_size=262_208,
    )
    return GemmaConfig(**(base | sizes))


def gemma3_270m() -> GemmaConfig:
    return _gemma3(
        vocab_size=262_144,
        hidden_size=640,
        intermediate_size=2048,
        num_layers=18,
        sliding_window=512,
        global_rope_scale=1.0,
        max_position_embeddings=32_768,
    )


def gemma3_1b() -> GemmaConfig:
    return _gemma3(
        vocab_size=262_144,
        hidden_size=1152,
        intermediate_size=6912,
        num_layers=26,
        sliding_window=512,
        global_rope_scale=1.0,
        max_position_embeddings=32_768,
    )


def gemma3_4b() -> GemmaConfig:
    return _gemma3(hidden_size=2560, intermediate_size=10240, num_layers=34, num_heads=8, num_kv_heads=4)


def gemma3_12b() -> GemmaConfig:
    return _gemma3(hidden_size=3840, intermediate_size=15360, num_layers=48, num_heads=16, num_kv_heads=8)


def gemma3_27b() -> GemmaConfig:
    return _gemma3(
        hidden_size=5376,
        intermediate_size=21504,
        num_layers=62,
        num_heads=32,
        num_kv_heads=16,
        head_dim=128,
        query_pre_attn_scalar=168,
    )


def gemma3_tiny(**overrides: Any) -> GemmaConfig:
    """Gemma-3 options on the tiny sizes: 8 layers = one 6-layer period + a 2-layer tail."""
    return _gemma3(**(_TINY | dict(num_layers=8, global_rope_scale=2.0, max_position_embeddings=8192) | overrides))


PRESETS = {
    "gemma2_2b": gemma2_2b,
    "gemma2_9b": gemma2_9b,
    "gemma2_27b": gemma2_27b,
    "gemma2_tiny": gemma2_tiny,
    "gemma3_270m": gemma3_270m,
    "gemma3_1b": gemma3_1b,
    "gemma3_4b": gemma3_4b,
    "gemma3_12b": gemma3_12b,
    "gemma3_27b": gemma3_27b,
    "gemma3_tiny": gemma3_tiny,
}


def preset(name: str) -> GemmaConfig:
    """Look up a preset by name, with an error that lists the valid names."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
