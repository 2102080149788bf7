"""8-bit numerics: a quantized array as data (`QArray`), per-channel quantization, and the einsum that takes either.

A `QArray` is 8-bit `values` (float8_e4m3fn or int8) plus a float32 `scale` over their leading axes:
w ~= values * scale[..., None, ...], one scale per index of the leading axes (absmax over the trailing,
reduced axes / the dtype's largest value). `w8a8` says how a projection uses it. The same layout holds
a projection kernel ([O..., K...], scale [O...]), an int8 embedding table ([V, D], scale [V]), and the new keys
and values an 8-bit KV cache stores ([B, T, K, H], scale [B, T, K]; kv_cache.py keeps the scales beside its slots).

Kernels store their contracting axes last ("K-minor", the [out, in] order of HF's weights): the operand
layout cuBLASLt's FP8 GEMM reads directly, so on Hopper XLA feeds the stored weight into
`__cublas$lt$matmul$f8` instead of transposing it on every call. Projection einsums have the form
`...K,KO->...O` (x's trailing letters K contract with the kernel's leading ones); on the quantized
kernel [O..., K...] that becomes `...K,OK->...O`.

Symmetric scaling throughout: e4m3 keeps 3 mantissa bits over its exponent range (relative error
<= 2^-4 per element), int8 a uniform grid of 255 steps (error <= scale / 2 per element).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp

FP8 = jnp.float8_e4m3fn
INT8 = jnp.int8
FP8_MAX = float(jnp.finfo(FP8).max)  # 448; e4m3fn has no inf, overflow would become NaN, so always clip
INT8_MAX = 127.0  # symmetric: -128 is never used, so -q is always representable
STORAGE = {"fp8": FP8, "int8": INT8}  # storage name (checkpoints, `--dtype`) -> 8-bit dtype
WEIGHT_ONLY = "weight_only"
W8A8 = "w8a8"
MODES = (WEIGHT_ONLY, W8A8)


class QuantError(ValueError):
    """A tensor cannot be quantized (inf/NaN values, or an einsum the quantized matmul does not support)."""


Fp8Error = QuantError  # the name from when FP8 was the only 8-bit type


def qmax(dtype: jnp.dtype) -> float:
    """The largest magnitude a scale maps onto: 448 for e4m3, 127 for int8."""
    if jnp.dtype(dtype) == FP8:
        return FP8_MAX
    if jnp.dtype(dtype) == INT8:
        return INT8_MAX
    raise QuantError(f"{jnp.dtype(dtype)} is not an 8-bit storage type; use one of {', '.join(STORAGE)}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
    """8-bit values with a float32 scale per index of their leading axes (see the module docstring).

    A pytree (values and scale are its leaves, `w8a8` is static), so it passes through jit, scan and
    tree maps like the array it stands for; `einsum` accepts it where it accepts a kernel.
    """

    values: jax.Array  # [O..., K...] float8_e4m3fn or int8
    scale: jax.Array  # [O...] float32
    w8a8: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def reduced_ndim(self) -> int:
        """How many trailing axes of `values` share one scale."""
        return self.values.ndim - self.scale.ndim

    def dequantize(self, dtype: jnp.dtype = jnp.float32) -> jax.Array:
        """values * scale in `dtype`, same layout as `values`."""
        scale = self.scale[(..., *([None] * self.reduced_ndim))]
        return (self.values.astype(jnp.float32) * scale).astype(dtype)

    def take(self, indices: jax.Array, dtype: jnp.dtype = jnp.float32) -> jax.Array:
        """Rows `indices` of the leading axis, dequantized: [*indices.shape, ...]. Only the gathered rows are
        read and converted (an embedding lookup), never the whole table."""
        rows = QArray(jnp.take(self.values, indices, axis=0), jnp.take(self.scale, indices, axis=0))
        return rows.dequantize(dtype)


def quantize(x: jax.Array, reduced_ndim: int, dtype: jnp.dtype, *, w8a8: bool = False) -> QArray:
    """Symmetric absmax quantization of x to `dtype`, one scale per index of all but the last `reduced_ndim` axes.

    An all-zero slice keeps scale 1 (no 0/0). inf/NaN are not checked here (see `quantize_kernel`).
    """
    values, scale, _ = _quantize(x, reduced_ndim, jnp.dtype(dtype))
    return QArray(values, scale, w8a8)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize(x: jax.Array, reduced_ndim: int, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(values, scale, finite): see `quantize`; `finite` [leading axes] is False where a slice holds inf/NaN."""
    top = qmax(dtype)
    x = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - reduced_ndim, x.ndim))
    finite = jnp.isfinite(x).all(axis=axes)
    amax = jnp.max(jnp.abs(x), axis=axes)
    scale = jnp.where(amax > 0, amax / top, 1.0)
    y = jnp.clip(x / scale[(..., *([None] * reduced_ndim))], -top, top)
    return (jnp.round(y) if dtype == INT8 else y).astype(dtype), scale, finite


def split_spec(spec: str) -> tuple[str, str, str]:
    """'BTD,DNH->BTNH' -> ('BT', 'D', 'NH'): the batch, contracting and output letters of a `...K,KO->...O` einsum."""
    inputs, out = spec.replace(" ", "").split("->")
    x, w = inputs.split(",")
    k = "".join(c for c in w if c in x and c not in out)
    b, o = x[: len(x) - len(k)], w[len(k) :]
    if not k or x != b + k or w != k + o or out != b + o:
        raise QuantError(f"einsum {spec!r} is not of the form '...K,KO->...O' that quantized projections support")
    return b, k, o


def _normalize_axes(axes: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    normalized = tuple(sorted(a % ndim for a in axes)) if all(-ndim <= a < ndim for a in axes) else ()
    if not normalized or len(set(normalized)) != len(axes) or len(normalized) == ndim:
        raise QuantError(f"contracting axes {axes} must be distinct axes of a {ndim}-d kernel, leaving an output axis")
    return normalized


def quantize_kernel(
    w: jax.Array | jax.ShapeDtypeStruct,
    contracting_axes: int | tuple[int, ...],
    *,
    name: str = "kernel",
    dtype: jnp.dtype = FP8,
) -> tuple[jax.Array, jax.Array]:
    """w -> (q, scale): 8-bit values with the contracting axes moved last, and a float32 scale per output channel.

    Any axis not contracted (output channels, and a leading `layers` stack axis) gets its own scale, so
    q * scale[..., None] reproduces w to `dtype` precision. A ShapeDtypeStruct gives ShapeDtypeStructs
    (for abstract models). inf or NaN in w raises `QuantError` naming `name`.
    """
    axes = _normalize_axes(contracting_axes, len(w.shape))
    keep = [a for a in range(len(w.shape)) if a not in axes]

    def run(w):
        return _quantize(jnp.transpose(w, (*keep, *axes)), len(axes), jnp.dtype(dtype))

    if isinstance(w, jax.ShapeDtypeStruct):
        q, scale, _ = jax.eval_shape(run, w)
        return q, scale
    q, scale, finite = run(w)
    if isinstance(finite, jax.core.Tracer):  # traced (e.g. inside nnx.eval_shape): nothing to check yet
        return q, scale
    bad = int(finite.size - jnp.count_nonzero(finite))
    if bad:
        raise QuantError(
            f"{name}: {bad} of {finite.size} output channels contain inf or NaN, which {jnp.dtype(dtype).name} "
            "cannot represent; fix the checkpoint (or the run that produced it) before quantizing"
        )
    return q, scale


def dequantize_kernel(q: jax.Array, scale: jax.Array, contracting_axes: int | tuple[int, ...]) -> jax.Array:
    """Inverse of `quantize_kernel`: float32 w in the original layout (contracting axes back in place)."""
    axes = _normalize_axes(contracting_axes, q.ndim)
    w = QArray(q, scale).dequantize()  # [O..., K...]
    keep = [a for a in range(q.ndim) if a not in axes]
    return jnp.transpose(w, tuple(sorted(range(q.ndim), key=[*keep, *axes].__getitem__)))


def einsum(spec: str, x: jax.Array, w: jax.Array | QArray, *, out_dtype: jnp.dtype | None = None) -> jax.Array:
    """einsum(spec, x, w) for a float kernel w, or a `QArray` kernel [O..., K...]; output in `out_dtype`
    (default x's dtype: float32 logits of a bf16 model ask for more).

    Float: w is cast to x's dtype and the product accumulates in float32 (more exact in bfloat16, and XLA's
    CPU bf16 dot is fast only with an f32 result). Weight-only: the 8-bit values are upcast inside the matmul
    (exact: every e4m3 value and every int8 is a bf16) so only 8-bit bytes are read, and the per-channel
    scale multiplies the float32 output.
    W8A8: x is flattened to [M, K] and quantized per token to the kernel's dtype; the 8-bit x 8-bit
    `dot_general` with one contracting and one free dimension per operand is the pattern XLA lowers to a
    native GEMM: cuBLASLt's FP8 GEMM on Hopper, the int8 MXU path (int32 accumulation) on TPU. Per-channel and
    per-token scales cannot be fused into those calls, so both multiply the [M, O] output.
    """
    dtype = x.dtype
    out_dtype = out_dtype or dtype
    if not isinstance(w, QArray):
        return float_einsum(spec, x, w.astype(dtype)).astype(out_dtype)
    b, k, o = split_spec(spec)
    if not w.w8a8:
        y = jnp.einsum(f"{b}{k},{o}{k}->{b}{o}", x, w.values.astype(dtype), preferred_element_type=jnp.float32)
        return (y * w.scale).astype(out_dtype)
    batch_shape, out_shape = x.shape[: len(b)], w.values.shape[: len(o)]
    contract = math.prod(x.shape[len(b) :])
    xq = quantize(x.reshape(-1, contract), 1, w.values.dtype)  # per token: [M, K], scale [M]
    accumulate = jnp.int32 if w.values.dtype == INT8 else dtype
    y = jax.lax.dot_general(
        xq.values, w.values.reshape(-1, contract), (((1,), (1,)), ((), ())), preferred_element_type=accumulate
    )  # [M, O]
    y = y.astype(jnp.float32) * xq.scale[:, None] * w.scale.reshape(1, -1)
    return y.astype(out_dtype).reshape(*batch_shape, *out_shape)


# One-row matmuls on CPU read a bf16 weight of at least this many elements (1 MiB in float32) as stored.
PAD_MIN_SIZE = 1 << 18


def float_einsum(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum(spec, x, w) accumulated and returned in float32.

    XLA:CPU runs a 16-bit float matmul of a single row (a batch-1 decode step) as a float32 one, converting
    the whole weight first; in a decode loop those converts are hoisted, a float32 copy of every weight per
    call (2b shape, 4 layers, bf16: 2.5 s a call). Two rows take its bf16 GEMM, so there a single row is
    computed beside a zero row, for weights of `PAD_MIN_SIZE` elements or more. A smaller weight's float32
    copy is cheap and stays in cache, and the pad's concatenate and slice cost more than they save (peers'
    tiny config, bf16, batch 1, best of 30: about 5.5k tok/s padded, 6.8k not).
    """
    (x_axes, w_axes), out_axes = (part.split(",") for part in spec.split("->"))
    rows = math.prod(n for axis, n in zip(x_axes, x.shape, strict=True) if axis not in w_axes)
    leading = out_axes[0][0] == x_axes[0]  # the zero row goes on x's first axis, which leads the output
    pad = rows == 1 and leading and x.dtype.itemsize == 2 and w.size >= PAD_MIN_SIZE and jax.default_backend() == "cpu"
    if pad:
        x = jnp.concatenate([x, jnp.zeros_like(x)])
    y = jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)
    return y[:1] if pad else y


def native_fp8_dot(device: jax.Device | None = None) -> bool:
    """Whether `device` runs an e4m3 x e4m3 dot as a native FP8 GEMM: NVIDIA compute capability >= 8.9.

    Elsewhere (CPU, TPU, older GPUs) XLA upcasts the operands: W8A8 then costs accuracy for no speed.
    """
    device = device or jax.devices()[0]
    capability = str(getattr(device, "compute_capability", ""))
    major, _, minor = capability.partition(".")
    if device.platform != "gpu" or not (major.isdigit() and minor.isdigit()):
        return False
    return (int(major), int(minor)) >= (8, 9)


def native_int8_dot(device: jax.Device | None = None) -> bool:
    """Whether `device` has an int8 x int8 -> int32 matrix unit XLA targets: TPUs (v5e's only low-precision one)."""
    return (device or jax.devices()[0]).platform == "tpu"


def native_dot(storage: str, device: jax.Device | None = None) -> bool:
    """Whether W8A8 in `storage` ("fp8" or "int8") runs natively on `device`."""
    return native_fp8_dot(device) if STORAGE[storage] == FP8 else native_int8_dot(device)


@dataclasses.dataclass(frozen=True)
class Scheme:
    """How the projections of a model being built are stored (`storage`: fp8, int8) and run (`mode`)."""

    storage: str
    mode: str = WEIGHT_ONLY

    def __post_init__(self):
        if self.storage not in STORAGE:
            raise QuantError(f"unknown 8-bit storage {self.storage!r}; choose one of {', '.join(STORAGE)}")
        if self.mode not in MODES:
            raise QuantError(f"unknown {self.storage.upper()} mode {self.mode!r}; choose one of {', '.join(MODES)}")

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(STORAGE[self.storage])

    @property
    def quantize_embedding(self) -> bool:
        """int8 stores the embedding (also the tied logits matrix) per vocab row too; FP8 keeps it float.

        An int8 row is a uniform grid of 255 steps over the row's range (error <= absmax/254 per element),
        e4m3 has 3 mantissa bits (up to 1/16 relative): quantizing the embedding to e4m3 added ~50% to the
        logits error of FP8 projections (benchmarks/fp8.py, "weight-only + fp8 embedding"), while int8 takes
        the whole Gemma 3 270M checkpoint from 0.814x to 0.503x the bf16 bytes with perplexity 37.18 against
        bf16's 37.67 (benchmarks/fp8.py --real-model default).
        """
        return self.storage == "int8"


_SCHEME: contextvars.ContextVar[Scheme | None] = contextvars.ContextVar("gemma_jax_quant_scheme", default=None)


@contextlib.contextmanager
def projections(scheme: Scheme | None) -> Iterator[None]:
    """Projections (`Linear`) constructed inside this block are built quantized by `scheme` (None: float).

    Construction is the only time a projection's storage is decided: quantizing a model builds a new one
    in this context and fills it with quantized params (gemma_jax.fp8), nothing is changed on a built model.
    """
    token = _SCHEME.set(scheme)
    try:
        yield
    finally:
        _SCHEME.reset(token)


def current_scheme() -> Scheme | None:
    """The scheme `projections` set for the modules being constructed now (None: float projections)."""
    return _SCHEME.get()
