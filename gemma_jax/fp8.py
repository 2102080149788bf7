"""FP8 models: every projection as e4m3 with per-output-channel scales, run weight-only or W8A8.

Quantized: the attention q, k, v, o and MLP gate, up, down projections (every `Linear`, ~90% of the
weight bytes of a 9B). Kept in the float dtype: the embedding, which is also the tied logits matrix
(benchmarks/fp8.py --quality-only measures quantizing it too: it adds ~50% to the logits error
of FP8 projections on tiny random models), and the norms.

Storage is the same for both modes: each projection's {"kernel": w} becomes
{"kernel": e4m3 [..., out, in], "scale": f32 [..., out]} (layout and numerics: gemma_jax/quant.py),
with the logical axes permuted alike, so FP8 params shard exactly like the bf16 ones. The compute
mode is a static attribute of each `Linear`, chosen when the model is built:
  - "weight_only": FP8 kernels upcast inside the matmul; halves the bytes read, runs everywhere.
  - "w8a8": activations quantized per token, e4m3 x e4m3 GEMM (native on NVIDIA >= sm_89).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_jax import quant, transformer
from gemma_jax.config import GemmaConfig
from gemma_jax.linear import Linear

WEIGHT_ONLY = "weight_only"
W8A8 = "w8a8"
MODES = (WEIGHT_ONLY, W8A8)


def resolve_mode(mode: str, *, emulate: bool = False) -> str:
    """Check `mode`; W8A8 without a native FP8 matmul falls back to weight-only, with a warning.

    `emulate=True` keeps W8A8 anyway (XLA upcasts the e4m3 dot): W8A8 numerics, no speed-up.
    """
    if mode not in MODES:
        raise ValueError(f"unknown FP8 mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == W8A8 and not emulate and not quant.native_fp8_dot():
        device = jax.devices()[0]
        warnings.warn(
            f"W8A8 needs a native FP8 matmul (NVIDIA compute capability >= 8.9); {device.device_kind} has none, "
            "so FP8 weights run weight-only",
            stacklevel=3,
        )
        return WEIGHT_ONLY
    return mode


def _linears(model: nnx.Module) -> Iterator[tuple[tuple, Linear]]:
    """(path, module) for every projection; a path is the module's key path in `params_of` layout."""
    for path, module in nnx.iter_modules(model):
        if isinstance(module, Linear):
            yield path, module


def _contracting_axes(spec: str, ndim: int) -> tuple[int, ...]:
    """Kernel axes contracted by `spec`, after any leading stack axes (the `layers` axis of scanned groups)."""
    _, k, o = quant.split_spec(spec)
    stack = ndim - len(k) - len(o)
    return tuple(range(stack, stack + len(k)))


def _name(path: tuple) -> str:
    return ".".join(map(str, path))


def _quantize_linear(linear: Linear, name: str) -> None:
    """Replace the float kernel by an FP8 kernel [..., out, in] and its scale [..., out], logical axes alike."""
    w = linear.kernel.get_value()
    axes = linear.kernel.get_metadata()["logical_axes"]
    contracting = _contracting_axes(linear.spec, len(w.shape))
    q, scale = quant.quantize_kernel(w, contracting, name=name)
    out_axes = tuple(a for i, a in enumerate(axes) if i not in contracting)
    linear.kernel = nnx.Param(q, logical_axes=out_axes + tuple(axes[i] for i in contracting))
    linear.scale = nnx.Param(scale, logical_axes=out_axes)


def quantize_model(model: nnx.Module, mode: str = WEIGHT_ONLY, *, emulate: bool = False) -> nnx.Module:
    """Make every projection of `model` FP8 (in place) and set its compute mode; returns `model`.

    Float kernels are quantized (inf/NaN raises `quant.Fp8Error` naming the tensor); kernels that are
    already FP8 (e.g. restored from an FP8 checkpoint) only switch mode. Abstract models (from
    `abstract_model`) stay abstract. See `resolve_mode` for W8A8 on hardware without FP8 matmuls.
    """
    mode = resolve_mode(mode, emulate=emulate)
    for path, linear in _linears(model):
        if linear.quant is None:
            _quantize_linear(linear, _name((*path, "kernel")))
        linear.quant = mode
    return model


def abstract_model(
    config: GemmaConfig,
    *,
    dtype: jnp.dtype = jnp.bfloat16,
    param_dtype: jnp.dtype = jnp.bfloat16,
    mode: str = WEIGHT_ONLY,
    emulate: bool = False,
) -> transformer.Transformer:
    """The FP8 model with ShapeDtypeStruct leaves: the restore target (and sharding source) of FP8 checkpoints.

    `param_dtype` is the dtype of what stays float (embedding, norms).
    """
    model = transformer.abstract_model(config, dtype=dtype, param_dtype=param_dtype)
    return quantize_model(model, mode, emulate=emulate)


def from_params(
    config: GemmaConfig,
    params: dict,
    *,
    dtype: jnp.dtype = jnp.bfloat16,
    mode: str = WEIGHT_ONLY,
    emulate: bool = False,
) -> transformer.Transformer:
    """An FP8 model holding `params` (an FP8 tree, from `quantize_params` or an FP8 checkpoint)."""
    param_dtype = jnp.dtype(params["embedder"]["embedding"].dtype)
    model = abstract_model(config, dtype=dtype, param_dtype=param_dtype, mode=mode, emulate=emulate)
    return transformer.with_params(model, params)


def _projection_paths(config: GemmaConfig) -> Iterator[tuple[tuple, str]]:
    """(path of each projection in our nested params layout, its einsum spec); shapes only, ~0.1 s for a 9B."""
    for path, linear in _linears(transformer.abstract_model(config)):
        yield path, linear.spec


def _map_projections(config: GemmaConfig, params: dict, fn) -> dict:
    """A copy of `params` with each projection's dict {"kernel", ...} replaced by fn(name, spec, node).

    Projections absent from `params` are skipped, so a partial tree (one leaf streamed by the
    converter) maps too.
    """
    out = jax.tree.map(lambda x: x, params)  # fresh dicts, shared leaves
    for path, spec in _projection_paths(config):
        parent = out
        for key in path[:-1]:
            parent = parent.get(key, {})
        if path[-1] in parent:
            parent[path[-1]] = fn(_name(path), spec, parent[path[-1]])
    return out


def quantize_params(config: GemmaConfig, params: dict) -> dict:
    """Our nested float params -> the FP8 tree: each projection {"kernel": e4m3 [..., out, in], "scale": f32}.

    Everything else (embedding, norms) is left as given. The result loads with `from_params` and is
    what an FP8 checkpoint stores.
    """

    def quantize(name: str, spec: str, node: dict) -> dict:
        w = node["kernel"]
        q, scale = quant.quantize_kernel(w, _contracting_axes(spec, w.ndim), name=f"{name}.kernel")
        return {"kernel": q, "scale": scale}

    return _map_projections(config, params, quantize)


def dequantize_params(config: GemmaConfig, params: dict, dtype: jnp.dtype = jnp.float32) -> dict:
    """The FP8 tree -> float params in the original layout (for `to_hf_state_dict` or comparisons)."""

    def dequantize(name: str, spec: str, node: dict) -> dict:
        q = node["kernel"]
        return {"kernel": quant.dequantize_kernel(q, node["scale"], _contracting_axes(spec, q.ndim)).astype(dtype)}

    return _map_projections(config, params, dequantize)


def is_quantized(params: dict) -> bool:
    """Whether a params tree holds FP8 kernels (the layout of `quantize_params`)."""
    return any(jnp.dtype(x.dtype) == quant.FP8 for x in jax.tree.leaves(params))
