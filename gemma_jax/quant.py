"""FP8 (e4m3) numerics: per-output-channel weight quantization and the two quantized matmuls.

A quantized kernel is `float8_e4m3fn` values plus a float32 scale per output channel (absmax over the
contracting axes / 448), so w ~= q * scale. The contracting axes are stored last ("K-minor", the
[out, in] order of HF's weights): that is the operand layout cuBLASLt's FP8 GEMM reads directly, so on
Hopper XLA feeds the stored weight into `__cublas$lt$matmul$f8` instead of transposing it on every call.

Projection einsums have the form `...K,KO->...O` (x's trailing letters K contract with the kernel's
leading ones); on the quantized kernel [O..., K...] that becomes `...K,OK->...O`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

FP8 = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8).max)  # 448; e4m3fn has no inf, overflow would become NaN, so always clip


class Fp8Error(ValueError):
    """A tensor cannot be quantized (inf/NaN values, or an einsum the FP8 matmul does not support)."""


def split_spec(spec: str) -> tuple[str, str, str]:
    """'BTD,DNH->BTNH' -> ('BT', 'D', 'NH'): the batch, contracting and output letters of a `...K,KO->...O` einsum."""
    inputs, out = spec.replace(" ", "").split("->")
    x, w = inputs.split(",")
    k = "".join(c for c in w if c in x and c not in out)
    b, o = x[: len(x) - len(k)], w[len(k) :]
    if not k or x != b + k or w != k + o or out != b + o:
        raise Fp8Error(f"einsum {spec!r} is not of the form '...K,KO->...O' that FP8 projections support")
    return b, k, o


@functools.partial(jax.jit, static_argnums=1)
def _quantize(w: jax.Array, contracting_axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(q [O..., K...] e4m3, scale [O...] f32, finite [O...] bool) for w with its contracting axes moved last."""
    n = len(contracting_axes)
    keep = [a for a in range(w.ndim) if a not in contracting_axes]
    w = jnp.transpose(w, (*keep, *contracting_axes)).astype(jnp.float32)  # [O..., K...]
    k_axes = tuple(range(w.ndim - n, w.ndim))
    finite = jnp.isfinite(w).all(axis=k_axes)  # [O...]
    amax = jnp.max(jnp.abs(w), axis=k_axes)  # [O...]
    scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0)  # an all-zero channel keeps scale 1: no 0/0
    q = jnp.clip(w / scale[(..., *([None] * n))], -FP8_MAX, FP8_MAX).astype(FP8)
    return q, scale, finite


def _normalize_axes(axes: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    normalized = tuple(sorted(a % ndim for a in axes)) if all(-ndim <= a < ndim for a in axes) else ()
    if not normalized or len(set(normalized)) != len(axes) or len(normalized) == ndim:
        raise Fp8Error(f"contracting axes {axes} must be distinct axes of a {ndim}-d kernel, leaving an output axis")
    return normalized


def quantize_kernel(
    w: jax.Array | jax.ShapeDtypeStruct, contracting_axes: int | tuple[int, ...], *, name: str = "kernel"
) -> tuple[jax.Array, jax.Array]:
    """w -> (q, scale): e4m3 values with the contracting axes moved last, and a float32 scale per output channel.

    Any axis not contracted (output channels, and a leading `layers` stack axis) gets its own scale, so
    q * scale[..., None] reproduces w to e4m3 precision (relative error <= 2^-4 per element in the
    normal range). A ShapeDtypeStruct gives ShapeDtypeStructs (for abstract models). inf or NaN in w
    raises `Fp8Error` naming `name`.
    """
    axes = _normalize_axes(contracting_axes, len(w.shape))
    if isinstance(w, jax.ShapeDtypeStruct):
        q, scale, _ = jax.eval_shape(lambda w: _quantize(w, axes), w)
        return q, scale
    q, scale, finite = _quantize(w, axes)
    if isinstance(finite, jax.core.Tracer):  # traced (e.g. inside nnx.eval_shape): nothing to check yet
        return q, scale
    bad = int(finite.size - jnp.count_nonzero(finite))
    if bad:
        raise Fp8Error(
            f"{name}: {bad} of {finite.size} output channels contain inf or NaN, which FP8 cannot represent; "
            "fix the checkpoint (or the run that produced it) before quantizing"
        )
    return q, scale


def dequantize_kernel(q: jax.Array, scale: jax.Array, contracting_axes: int | tuple[int, ...]) -> jax.Array:
    """Inverse of `quantize_kernel`: float32 w in the original layout (contracting axes back in place)."""
    axes = _normalize_axes(contracting_axes, q.ndim)
    n = len(axes)
    w = q.astype(jnp.float32) * scale[(..., *([None] * n))]  # [O..., K...]
    keep = [a for a in range(q.ndim) if a not in axes]
    return jnp.transpose(w, tuple(sorted(range(q.ndim), key=[*keep, *axes].__getitem__)))


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [M, K] -> (xq [M, K] e4m3, scale [M] f32): dynamic per-token absmax scaling of activations."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)  # [M]
    scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
    return jnp.clip(x / scale[:, None], -FP8_MAX, FP8_MAX).astype(FP8), scale


def fp8_einsum(spec: str, x: jax.Array, q: jax.Array, scale: jax.Array, *, w8a8: bool) -> jax.Array:
    """einsum(spec, x, w) for an FP8 kernel q [O..., K...] with scale [O...]; output in x's dtype.

    Weight-only: q is upcast inside the matmul (exact: every e4m3 value is a bf16) so only FP8 bytes
    are read, and the per-channel scale multiplies the float32 output.
    W8A8: x is flattened to [M, K] and quantized per token; the e4m3 x e4m3 `dot_general` with one
    contracting and one free dimension per operand is the pattern XLA rewrites to cuBLASLt's FP8
    GEMM on Hopper. Per-channel and per-token scales cannot be fused into that call (it takes scalar
    scales only), so both multiply its [M, O] output.
    """
    b, k, o = split_spec(spec)
    dtype = x.dtype
    if not w8a8:
        y = jnp.einsum(f"{b}{k},{o}{k}->{b}{o}", x, q.astype(dtype), preferred_element_type=jnp.float32)
        return (y * scale).astype(dtype)
    batch_shape, out_shape = x.shape[: len(b)], q.shape[: len(o)]
    contract = math.prod(x.shape[len(b) :])
    xq, x_scale = quantize_rows(x.reshape(-1, contract))  # [M, K], [M]
    y = jax.lax.dot_general(
        xq, q.reshape(-1, contract), (((1,), (1,)), ((), ())), preferred_element_type=dtype
    )  # [M, O]
    y = y.astype(jnp.float32) * x_scale[:, None] * scale.reshape(1, -1)
    return y.astype(dtype).reshape(*batch_shape, *out_shape)


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
