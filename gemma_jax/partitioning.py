"""Logical axes -> mesh axes: the part of sharding the model itself needs (jax only, below the model).

Parameters declare their logical axes where they are defined (`nnx.Param(..., logical_axes=("embed", "mlp"))`);
activations and the KV cache name theirs below. `LOGICAL_RULES` maps each name onto a mesh with axes
("data", "fsdp", "tensor"):

- data:   the batch only; parameters are replicated over it (pure data parallelism).
- fsdp:   the batch, and the embed dimension of every parameter (ZeRO-3: each layer's weights are gathered
          when it runs, so no device holds the whole model).
- tensor: heads, kv heads, mlp and vocab (Megatron: the residual stream is replicated over it).

A dimension must be divisible by the mesh axes that shard it, or `ShardingError` names the axis and the
sizes before anything compiles. Two names fall back instead (`SHRINKABLE`): `batch` (one prompt on eight
chips is split over as many leading mesh axes as divide it, down to none) and `kv_heads` (Gemma 2 2B has 4 kv
heads: under tensor=8 its k/v projections and KV cache are replicated over tensor, the 8 query heads stay split).

Model code calls `constrain(x, axes)`: a no-op without a mesh, inside `shard_map` (manual axes: the caller's
specs decide the layout there) and on a mesh none of whose axes the rules name, so the model runs unchanged
inside a researcher's own jit / grad / shard_map. `axis_rules(table)` swaps the table for the model's calls.
Meshes, CLI flags, multi-host start and sharded init live above the model, in `gemma_jax.sharding`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Rules = Mapping[str, tuple[str, ...]]

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    # parameters
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "layers": (),
    # activations and KV cache
    "batch": ("data", "fsdp"),
    "length": (),
    "act_embed": (),
    "act_vocab": ("tensor",),
}

# Names that shrink to the leading mesh axes whose sizes divide them (down to replication) instead of failing.
SHRINKABLE = frozenset({"batch", "kv_heads"})

# Logical axes of the arrays named here rather than beside a parameter.
TOKENS = ("batch", "length")  # tokens, positions, mask [B, T]
RESIDUAL = ("batch", "length", "act_embed")  # x between blocks [B, T, D]
LOGITS = ("batch", "length", "act_vocab")  # [B, T, V]

_RULES: contextvars.ContextVar[Rules] = contextvars.ContextVar("gemma_jax_axis_rules", default=LOGICAL_RULES)


class ShardingError(ValueError):
    """A mesh or sharding that cannot work, named before anything compiles."""


@contextlib.contextmanager
def axis_rules(rules: Rules) -> Iterator[Rules]:
    """Use `rules` (logical name -> mesh axes) for the model's `constrain` calls traced inside this block.

    For a mesh with other axis names than ("data", "fsdp", "tensor"): the table is read while jax traces,
    so enter it around the `jax.jit` call (or the tracing), not inside the jitted function's later calls.
    """
    token = _RULES.set(dict(rules))
    try:
        yield rules
    finally:
        _RULES.reset(token)


def current_rules() -> Rules:
    """The table `constrain` uses when given none: `LOGICAL_RULES`, or what `axis_rules` set."""
    return _RULES.get()


def logical_spec(
    axes: Sequence[str | None],
    mesh: Mesh | AbstractMesh,
    shape: Sequence[int],
    rules: Rules | None = None,
) -> P:
    """The PartitionSpec of an array of `shape` whose dimensions are named `axes` (None = replicated).

    Mesh axes of size 1, and rule axes the mesh does not have, are left out. `rules` defaults to `current_rules()`.
    """
    rules = current_rules() if rules is None else rules
    if len(axes) != len(shape):
        raise ShardingError(f"{len(axes)} logical axes {tuple(axes)} for an array of shape {tuple(shape)}")
    sizes = dict(mesh.shape)
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape, strict=True):
        mesh_axes = _mesh_axes(name, dim, sizes, rules)
        if used & set(mesh_axes):
            raise ShardingError(f"mesh axis {sorted(used & set(mesh_axes))} would shard two dimensions of {axes}")
        used |= set(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return P(*spec)


def _mesh_axes(name: str | None, dim: int, sizes: Mapping[str, int], rules: Rules) -> tuple[str, ...]:
    if name is None:
        return ()
    if name not in rules:
        raise ShardingError(f"unknown logical axis {name!r}; the rules name {', '.join(sorted(rules))}")
    axes = tuple(a for a in rules[name] if sizes.get(a, 1) > 1)
    if dim % math.prod(sizes[a] for a in axes) == 0:
        return axes
    if name in SHRINKABLE:
        while dim % math.prod(sizes[a] for a in axes):
            axes = axes[:-1]
        return axes
    over = " x ".join(f"{a}={sizes[a]}" for a in axes)
    raise ShardingError(
        f"logical axis {name!r} has size {dim}, which mesh axes {over} (= {math.prod(sizes[a] for a in axes)}) "
        f"do not divide; choose a mesh whose {' x '.join(axes)} size divides {dim}"
    )


def logical_sharding(
    axes: Sequence[str | None], mesh: Mesh | AbstractMesh, shape: Sequence[int], rules: Rules | None = None
) -> NamedSharding:
    """NamedSharding of an array of `shape` whose dimensions are named `axes`."""
    return NamedSharding(mesh, logical_spec(axes, mesh, shape, rules))


def constrain(x: jax.Array, axes: Sequence[str | None], rules: Rules | None = None) -> jax.Array:
    """Pin an activation to the sharding its logical axes give under the active mesh; otherwise x as is.

    x is returned unchanged without a mesh, when any mesh axis is Manual (inside `shard_map`, where the
    caller's in/out specs own the layout) and when the mesh has none of the axes `rules` name.
    """
    rules = current_rules() if rules is None else rules
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or AxisType.Manual in mesh.axis_types:
        return x
    if not {a for mesh_axes in rules.values() for a in mesh_axes} & set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(axes, mesh, x.shape, rules))
