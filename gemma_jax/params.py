"""HF <-> gemma_jax parameter mapping: the one table of names, transposes and reshapes.

HF stores every projection as a torch Linear weight [out, in]; we store einsum kernels [in, ...out]
with heads split out. Layer i of HF lives at group i // P, slot i % P of our stacked `groups`
(P = pattern period), or in `tail` for layers past the last whole period.

Works on one tensor at a time (`hf_to_ours`, `ours_to_hf`) so the converter can stream, and on
whole in-memory state dicts (`from_hf_state_dict`, `to_hf_state_dict`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from gemma_jax.config import GemmaConfig

Path = tuple[str | int, ...]
Array = Any  # numpy or jax array; only .T / .reshape / .shape are used


class ParamMappingError(ValueError):
    """State dict does not match the architecture: names the missing, unexpected or misshapen tensors."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """HF tensor `hf` <-> our parameter at `ours`; `to_ours` / `to_hf` reshape between the layouts."""

    hf: str
    ours: Path
    to_ours: Callable[[Array, GemmaConfig], Array]
    to_hf: Callable[[Array, GemmaConfig], Array]


def _same(w: Array, c: GemmaConfig) -> Array:
    return w


def _t(w: Array, c: GemmaConfig) -> Array:
    return w.T


# fmt: off
GLOBAL_RULES = (
    Rule("model.embed_tokens.weight", ("embedder", "embedding"), _same, _same),  # [V, D]
    Rule("model.norm.weight", ("final_norm", "scale"), _same, _same),  # [D]
)
# Per layer; HF names are relative to "model.layers.{i}.", ours to the layer's Block.
LAYER_RULES = (
    Rule("input_layernorm.weight", ("pre_attn_norm", "scale"), _same, _same),
    Rule("post_attention_layernorm.weight", ("post_attn_norm", "scale"), _same, _same),
    Rule("pre_feedforward_layernorm.weight", ("pre_ffw_norm", "scale"), _same, _same),
    Rule("post_feedforward_layernorm.weight", ("post_ffw_norm", "scale"), _same, _same),
    # q: [N*H, D] -> [D, N, H]; k, v: [K*H, D] -> [D, K, H]; o: [D, N*H] -> [N, H, D]
    Rule("self_attn.q_proj.weight", ("attn", "q", "kernel"),
         lambda w, c: w.T.reshape(c.hidden_size, c.num_heads, c.head_dim),
         lambda w, c: w.reshape(c.hidden_size, c.num_heads * c.head_dim).T),
    Rule("self_attn.k_proj.weight", ("attn", "k", "kernel"),
         lambda w, c: w.T.reshape(c.hidden_size, c.num_kv_heads, c.head_dim),
         lambda w, c: w.reshape(c.hidden_size, c.num_kv_heads * c.head_dim).T),
    Rule("self_attn.v_proj.weight", ("attn", "v", "kernel"),
         lambda w, c: w.T.reshape(c.hidden_size, c.num_kv_heads, c.head_dim),
         lambda w, c: w.reshape(c.hidden_size, c.num_kv_heads * c.head_dim).T),
    Rule("self_attn.o_proj.weight", ("attn", "o", "kernel"),
         lambda w, c: w.T.reshape(c.num_heads, c.head_dim, c.hidden_size),
         lambda w, c: w.reshape(c.num_heads * c.head_dim, c.hidden_size).T),
    # gate, up: [F, D] -> [D, F]; down: [D, F] -> [F, D]
    Rule("mlp.gate_proj.weight", ("mlp", "gate", "kernel"), _t, _t),
    Rule("mlp.up_proj.weight", ("mlp", "up", "kernel"), _t, _t),
    Rule("mlp.down_proj.weight", ("mlp", "down", "kernel"), _t, _t),
)
# Gemma-3 only: RMSNorm over head_dim on q and k.
QK_NORM_RULES = (
    Rule("self_attn.q_norm.weight", ("attn", "q_norm", "scale"), _same, _same),  # [H]
    Rule("self_attn.k_norm.weight", ("attn", "k_norm", "scale"), _same, _same),  # [H]
)
# fmt: on
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
_GLOBAL_RULES_BY_NAME = {r.hf: r for r in GLOBAL_RULES}
# Tensors HF may save that carry no information of their own (tied to the embedding).
IGNORED_HF_TENSORS = frozenset({"lm_head.weight"})


def layer_rules(config: GemmaConfig) -> tuple[Rule, ...]:
    """The per-layer rules of this architecture."""
    return LAYER_RULES + (QK_NORM_RULES if config.qk_norm else ())


def layer_location(config: GemmaConfig, layer: int) -> tuple[Path, int | None]:
    """Where HF layer `layer` lives: (path of its Block, index on the stacked axis or None)."""
    period = len(config.layer_pattern)
    group, slot = divmod(layer, period)
    if group < config.num_groups:
        return ("groups", "layers", slot), group
    return ("tail", "layers", layer - config.num_groups * period), None


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one HF tensor goes: our parameter path, its index on the stacked layer axis, and its rule."""

    hf_name: str
    path: Path
    stack_index: int | None
    rule: Rule


def placement(name: str, config: GemmaConfig) -> Placement:
    """Locate HF tensor `name` in our tree; unknown names raise ParamMappingError."""
    if name in _GLOBAL_RULES_BY_NAME:
        rule = _GLOBAL_RULES_BY_NAME[name]
        return Placement(name, rule.ours, None, rule)
    m = _LAYER_NAME.fullmatch(name)
    rules = {r.hf: r for r in layer_rules(config)}
    if m and m.group(2) in rules and int(m.group(1)) < config.num_layers:
        rule = rules[m.group(2)]
        prefix, index = layer_location(config, int(m.group(1)))
        return Placement(name, prefix + rule.ours, index, rule)
    raise ParamMappingError(
        f"unexpected tensor {name!r}: not part of a {config.num_layers}-layer {config.model_type} model"
    )


def hf_names(config: GemmaConfig) -> Iterator[str]:
    """Every tensor name an HF checkpoint of this config holds, in HF order."""
    yield "model.embed_tokens.weight"
    for i in range(config.num_layers):
        for rule in layer_rules(config):
            yield f"model.layers.{i}.{rule.hf}"
    yield "model.norm.weight"


def hf_shape(name: str, config: GemmaConfig) -> tuple[int, ...]:
    """The shape HF stores tensor `name` with, for checking a checkpoint before converting it."""
    c = config
    d, f, q, kv = c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    suffix = name.rsplit(".", 2)[-2]
    return {
        "embed_tokens": (c.vocab_size, d),
        "q_proj": (q, d),
        "k_proj": (kv, d),
        "v_proj": (kv, d),
        "o_proj": (d, q),
        "gate_proj": (f, d),
        "up_proj": (f, d),
        "down_proj": (d, f),
        "q_norm": (c.head_dim,),
        "k_norm": (c.head_dim,),
    }.get(suffix, (d,))


def check_names(names: set[str] | frozenset[str], config: GemmaConfig) -> None:
    """Raise one error listing all missing and unexpected tensors (tied `lm_head.weight` is allowed)."""
    expected = set(hf_names(config))
    missing = sorted(expected - names)
    unexpected = sorted(names - expected - IGNORED_HF_TENSORS)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors {_short(unexpected)}")
        raise ParamMappingError(
            "; ".join(parts) + f" (checkpoint does not match a {config.num_layers}-layer config: check config.json)"
        )


def check_shape(name: str, shape: tuple[int, ...], config: GemmaConfig) -> None:
    expected = hf_shape(name, config)
    if tuple(shape) != expected:
        raise ParamMappingError(
            f"shape mismatch for {name!r}: expected {expected} from config.json, found {tuple(shape)}"
        )


def _short(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)} in all)"


def from_hf_state_dict(state_dict: Mapping[str, Array], config: GemmaConfig) -> dict:
    """HF tensors (numpy / torch-converted arrays) -> our nested parameter dict, stacked layers included."""
    check_names(set(state_dict), config)
    slots: dict[Path, dict[int | None, Array]] = {}
    for name in hf_names(config):
        w = np.asarray(state_dict[name])
        check_shape(name, w.shape, config)
        p = placement(name, config)
        slots.setdefault(p.path, {})[p.stack_index] = p.rule.to_ours(w, config)
    tree: dict = {}
    for path, by_index in slots.items():
        value = by_index[None] if None in by_index else np.stack([by_index[g] for g in sorted(by_index)])
        _set(tree, path, value)
    return tree


def to_hf_state_dict(params: Mapping, config: GemmaConfig) -> dict[str, np.ndarray]:
    """Our nested parameter dict -> HF tensor dict (numpy, HF layout and names, no lm_head)."""
    out = {}
    for name in hf_names(config):
        p = placement(name, config)
        w = np.asarray(_get(params, p.path))
        if p.stack_index is not None:
            w = w[p.stack_index]
        out[name] = np.ascontiguousarray(p.rule.to_hf(w, config))
    return out


def _set(tree: dict, path: Path, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: Path) -> Any:
    for key in path:
        tree = tree[key]
    return tree
