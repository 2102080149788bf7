"""LoRA: low-rank adapters wrapped around chosen projections, base weights frozen.

`apply_lora` swaps each targeted `Linear` for a `LoRALinear` that computes
  y = x W + (alpha / r) * (x A) B,   A: [in..., r], B: [r, out...], B = 0 at init,
so the adapted model starts equal to the base. The factors are `LoRAParam`s (a subclass of
nnx.Param), which is how the trainer tells them from the frozen base. Layers stacked for the scan
get stacked factors (leading `layers` axes), so the scanned body slices them like every other
weight and the full-size W + dW is never formed during training; `merge_lora` folds the factors
into the kernels (for saving a plain checkpoint) and unwraps the modules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_jax.linear import Linear

# Our projection names and the HF/PEFT names users know them by.
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
HF_ALIASES = {f"{t}_proj": t for t in TARGETS}
_RANK_LETTER = "R"


class LoRAParam(nnx.Param):
    """A trainable low-rank factor."""


def _split_spec(spec: str) -> tuple[str, str, str, str, str]:
    """'BTD,DNH->BTNH' -> (x letters, kernel letters, out letters, kernel in letters, kernel out letters)."""
    inputs, out = spec.replace(" ", "").split("->")
    x, w = inputs.split(",")
    if _RANK_LETTER in spec:
        raise ValueError(f"einsum {spec!r} already uses {_RANK_LETTER!r}, the LoRA rank letter")
    w_in = "".join(c for c in w if c in x)
    w_out = "".join(c for c in w if c not in x)
    return x, w, out, w_in, w_out


class LoRALinear(nnx.Module):
    """A frozen `Linear` plus a trainable rank-r update; `base` keeps the original kernel."""

    def __init__(self, base: Linear, *, rank: int, alpha: float, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        if base.quant is not None:
            raise ValueError("LoRA over 8-bit (FP8, int8) kernels is not supported: load the model in bf16 to train")
        x, w, out, w_in, w_out = _split_spec(base.spec)
        kernel = base.kernel
        stack = kernel.shape[: kernel.ndim - len(w)]  # leading axes of stacked (scanned) layers
        dims = dict(zip(w, kernel.shape[len(stack) :], strict=True))
        axes = dict(zip(w, kernel.get_metadata().get("logical_axes", (None,) * kernel.ndim)[len(stack) :], strict=True))
        stack_axes = ("layers",) * len(stack)
        a_shape = (*stack, *(dims[c] for c in w_in), rank)
        fan_in = math.prod(dims[c] for c in w_in)
        bound = 1.0 / math.sqrt(fan_in)  # PEFT's kaiming_uniform(a=sqrt(5)) bound
        self.base = base
        self.scale = alpha / rank
        self.dtype = base.dtype
        self.a = LoRAParam(
            jax.random.uniform(rngs.params(), a_shape, param_dtype, -bound, bound),
            logical_axes=(*stack_axes, *(axes[c] for c in w_in), None),
        )
        self.b = LoRAParam(
            jnp.zeros((*stack, rank, *(dims[c] for c in w_out)), param_dtype),
            logical_axes=(*stack_axes, None, *(axes[c] for c in w_out)),
        )
        batch = "".join(c for c in x if c not in w_in)
        r = _RANK_LETTER
        self.down_spec = f"{x},{w_in}{r}->{batch}{r}"  # x A
        self.up_spec = f"{batch}{r},{r}{w_out}->{out}"  # (x A) B
        self.delta_spec = f"...{w_in}{r},...{r}{w_out}->...{w}"  # A B, shaped like the kernel

    def __call__(self, x: jax.Array) -> jax.Array:
        low = jnp.einsum(self.down_spec, x.astype(self.dtype), self.a[...].astype(self.dtype))  # [..., r]
        update = jnp.einsum(self.up_spec, low, self.b[...].astype(self.dtype))
        return self.base(x) + (self.scale * update).astype(self.dtype)

    def merged_kernel(self) -> jax.Array:
        """W + (alpha / r) A B in the kernel's dtype (computed in float32)."""
        kernel = self.base.kernel[...]
        delta = jnp.einsum(self.delta_spec, self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32))
        return (kernel.astype(jnp.float32) + self.scale * delta).astype(kernel.dtype)


def _linears(model: nnx.Module) -> list[tuple[tuple, Linear]]:
    return [(path, m) for path, m in nnx.iter_graph(model) if isinstance(m, Linear) and path]


def _parent(model: nnx.Module, path: tuple) -> nnx.Module:
    node = model
    for key in path[:-1]:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def _set_child(parent, key, child) -> None:
    if isinstance(key, int):
        parent[key] = child
    else:
        setattr(parent, key, child)


def resolve_targets(targets: Sequence[str]) -> tuple[str, ...]:
    """Normalise target names ('all', our names, HF's `q_proj`...); unknown names are an error."""
    names: list[str] = []
    for t in targets:
        if t == "all":
            names.extend(TARGETS)
            continue
        name = HF_ALIASES.get(t, t)
        if name not in TARGETS:
            raise ValueError(
                f"LoRA target {t!r} matches no module; choose from {list(TARGETS)} (or HF names "
                f"{list(HF_ALIASES)}, or 'all')"
            )
        names.append(name)
    if not names:
        raise ValueError("no LoRA targets given; e.g. --lora-targets q,k,v,o")
    return tuple(dict.fromkeys(names))


def apply_lora(
    model: nnx.Module,
    targets: Sequence[str],
    *,
    rank: int,
    alpha: float,
    param_dtype: jnp.dtype = jnp.float32,
    seed: int = 0,
) -> list[str]:
    """Wrap the targeted projections of `model` in place; returns the wrapped module paths."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    names = resolve_targets(targets)
    chosen = [(path, m) for path, m in _linears(model) if path[-1] in names]
    unmatched = sorted(set(names) - {path[-1] for path, _ in chosen})
    if unmatched:
        raise ValueError(f"LoRA targets {unmatched} match no module of this model")
    rngs = nnx.Rngs(seed)
    for path, linear in chosen:
        wrapped = LoRALinear(linear, rank=rank, alpha=alpha, param_dtype=param_dtype, rngs=rngs)
        _set_child(_parent(model, path), path[-1], wrapped)
    return [".".join(map(str, path)) for path, _ in chosen]


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its kernel and unwrap it, in place: the result is a plain model."""
    wrapped = [(path, m) for path, m in nnx.iter_graph(model) if isinstance(m, LoRALinear) and path]
    for path, lora in wrapped:
        lora.base.kernel[...] = lora.merged_kernel()
        _set_child(_parent(model, path), path[-1], lora.base)
    return model
