"""8-bit models: every projection as FP8 (e4m3) or int8 with per-output-channel scales, run weight-only or W8A8.

Quantized: the attention q, k, v, o and MLP gate, up, down projections (every `Linear`, ~90% of the
weight bytes of a 9B), and with int8 storage the embedding too, per vocab row (it is also the tied logits
matrix, and 63% of the bytes of Gemma 3 270M). FP8 keeps the embedding in the float dtype
(benchmarks/fp8.py --quality-only measures quantizing it to e4m3: it adds ~50% to the logits error
of FP8 projections on tiny random models; see `quant.Scheme.quantize_embedding`). Norms stay float.

Storage (`storage`: "fp8" or "int8", both symmetric per output channel) is the same for both modes: each
projection's {"kernel": w} becomes {"kernel": 8-bit [..., out, in], "scale": f32 [..., out]} (layout and
numerics: gemma_jax/quant.py), with the logical axes permuted alike, so 8-bit params shard exactly like
the bf16 ones. Quantization is data: `quantize_params` / `dequantize_params` map a params tree, and a
quantized model is a model *built* quantized (`quant.projections`) that holds such a tree. The compute mode
is fixed when the model is built:
  - "weight_only": 8-bit kernels upcast inside the matmul; halves the bytes read, runs everywhere.
  - "w8a8": activations quantized per token, 8-bit x 8-bit GEMM: e4m3 on NVIDIA >= sm_89, int8 -> int32 on
    TPU (v5e has no FP8 unit; int8 is its native low-precision matmul).
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

WEIGHT_ONLY = quant.WEIGHT_ONLY
W8A8 = quant.W8A8
MODES = quant.MODES
STORAGES = tuple(quant.STORAGE)
_NATIVE = {"fp8": "a native FP8 matmul (NVIDIA compute capability >= 8.9)", "int8": "a native int8 matmul (TPU)"}


def resolve_mode(mode: str, *, emulate: bool = False, storage: str = "fp8") -> str:
    """Check `mode`; W8A8 without a native 8-bit matmul for `storage` falls back to weight-only, with a warning.

    `emulate=True` keeps W8A8 anyway (XLA upcasts the 8-bit dot): W8A8 numerics, no speed-up.
    """
    if mode not in MODES:
        raise ValueError(f"unknown {storage.upper()} mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == W8A8 and not emulate and not quant.native_dot(storage):
        device = jax.devices()[0]
        warnings.warn(
            f"W8A8 needs {_NATIVE[storage]}; {device.device_kind} has none, "
            f"so {storage.upper()} weights run weight-only",
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


def float_dtype(params: dict) -> jnp.dtype:
    """The dtype of what stays float in an 8-bit tree (norms; the embedding unless int8), read off the final norm."""
    return jnp.dtype(params["final_norm"]["scale"].dtype)


def quantize_model(
    model: transformer.Transformer, mode: str = WEIGHT_ONLY, *, emulate: bool = False, storage: str = "fp8"
) -> transformer.Transformer:
    """A new model whose projections are 8-bit (`storage`) and run in `mode`; `model` is left as it is.

    Float kernels are quantized (inf/NaN raises `quant.QuantError` naming the tensor); kernels that are
    already 8-bit (e.g. restored from an FP8 checkpoint) keep their values and storage, only the mode is
    new. Abstract models (from `abstract_model`) give abstract models. See `resolve_mode` for W8A8 on
    hardware without a native 8-bit matmul.
    """
    params = transformer.params_of(model)
    storage = storage_of(params) or storage
    mode = resolve_mode(mode, emulate=emulate, storage=storage)
    kw = dict(dtype=model.dtype, param_dtype=float_dtype(params), mode=mode, emulate=True, storage=storage)
    abstract = abstract_model(model.config, **kw)
    if isinstance(jax.tree.leaves(params)[0], jax.ShapeDtypeStruct):
        return abstract
    if storage_of(params) is None:
        params = quantize_params(model.config, params, storage=storage)
    return transformer.with_params(abstract, params)


def abstract_model(
    config: GemmaConfig,
    *,
    dtype: jnp.dtype = jnp.bfloat16,
    param_dtype: jnp.dtype = jnp.bfloat16,
    mode: str = WEIGHT_ONLY,
    emulate: bool = False,
    storage: str = "fp8",
) -> transformer.Transformer:
    """The 8-bit model with ShapeDtypeStruct leaves: the restore target (and sharding source) of 8-bit checkpoints.

    `param_dtype` is the dtype of what stays float (embedding, norms).
    """
    mode = resolve_mode(mode, emulate=emulate, storage=storage)
    with quant.projections(quant.Scheme(storage, mode)):
        return transformer.abstract_model(config, dtype=dtype, param_dtype=param_dtype)


def from_params(
    config: GemmaConfig,
    params: dict,
    *,
    dtype: jnp.dtype = jnp.bfloat16,
    mode: str = WEIGHT_ONLY,
    emulate: bool = False,
) -> transformer.Transformer:
    """An 8-bit model holding `params` (an 8-bit tree, from `quantize_params` or an FP8 / int8 checkpoint)."""
    storage = storage_of(params)
    if storage is None:
        raise quant.QuantError("these params hold no 8-bit kernels: quantize them first (quantize_params)")
    model = abstract_model(
        config, dtype=dtype, param_dtype=float_dtype(params), mode=mode, emulate=emulate, storage=storage
    )
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


def quantize_params(config: GemmaConfig, params: dict, *, storage: str = "fp8") -> dict:
    """Our nested float params -> the 8-bit tree: each projection {"kernel": 8-bit [..., out, in], "scale": f32}.

    int8 also stores the embedding per vocab row: {"embedding": int8 [V, D], "scale": f32 [V]}. Everything else
    (norms, and the embedding for FP8) is left as given. The result loads with `from_params` and is what an FP8
    or int8 checkpoint stores. A partial tree (one leaf streamed by the converter) maps too.
    """
    scheme = quant.Scheme(storage)

    def quantize(name: str, spec: str, node: dict) -> dict:
        w = node["kernel"]
        q, scale = quant.quantize_kernel(w, _contracting_axes(spec, w.ndim), name=f"{name}.kernel", dtype=scheme.dtype)
        return {"kernel": q, "scale": scale}

    out = _map_projections(config, params, quantize)
    embedder = out.get("embedder", {})
    if scheme.quantize_embedding and "embedding" in embedder and "scale" not in embedder:
        q, scale = quant.quantize_kernel(embedder["embedding"], 1, name="embedder.embedding", dtype=scheme.dtype)
        out["embedder"] = {"embedding": q, "scale": scale}  # [V, D] and [V]: rows already lead, nothing moves
    return out


def dequantize_params(config: GemmaConfig, params: dict, dtype: jnp.dtype = jnp.float32) -> dict:
    """The 8-bit tree -> float params in the original layout (for `to_hf_state_dict` or comparisons)."""

    def dequantize(name: str, spec: str, node: dict) -> dict:
        q = node["kernel"]
        return {"kernel": quant.dequantize_kernel(q, node["scale"], _contracting_axes(spec, q.ndim)).astype(dtype)}

    out = _map_projections(config, params, dequantize)
    embedder = out.get("embedder", {})
    if "scale" in embedder:  # an int8 embedding
        out["embedder"] = {"embedding": quant.QArray(embedder["embedding"], embedder["scale"]).dequantize(dtype)}
    return out


def storage_of(params: dict) -> str | None:
    """ "fp8" or "int8" for a tree of 8-bit kernels (the layout of `quantize_params`), None for float params."""
    dtypes = {jnp.dtype(x.dtype) for x in jax.tree.leaves(params)}
    return next((name for name, dtype in quant.STORAGE.items() if jnp.dtype(dtype) in dtypes), None)


def is_quantized(params: dict) -> bool:
    """Whether a params tree holds 8-bit kernels (the layout of `quantize_params`)."""
    return storage_of(params) is not None
