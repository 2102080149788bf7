"""Sharding above the model: meshes, `--mesh` and multi-host flags, sharded init of model, cache and optimizer.

The logical-axis table and `constrain` (what the model itself calls) live below the model, in
`gemma_jax.partitioning`; their names are re-exported here so one import serves a training script.
Meshes have the axes ("data", "fsdp", "tensor") that `LOGICAL_RULES` maps onto.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gemma_jax import kv_cache, transformer
from gemma_jax.config import GemmaConfig
from gemma_jax.kv_cache import KVCache, LayerCache
from gemma_jax.partitioning import (
    LOGICAL_RULES,
    LOGITS,
    MESH_AXES,
    RESIDUAL,
    SHRINKABLE,
    TOKENS,
    ShardingError,
    axis_rules,
    constrain,
    logical_sharding,
    logical_spec,
)

log = logging.getLogger(__name__)

__all__ = [  # re-exported from gemma_jax.partitioning
    "LOGICAL_RULES",
    "LOGITS",
    "MESH_AXES",
    "RESIDUAL",
    "SHRINKABLE",
    "TOKENS",
    "ShardingError",
    "axis_rules",
    "constrain",
    "logical_sharding",
    "logical_spec",
]

# `--mesh` presets; -1 takes the devices the other axes leave. tensor=4 divides the kv heads of every size (4/8/16).
PRESETS: dict[str, dict[str, int]] = {
    "data": {"data": -1},
    "fsdp": {"fsdp": -1},
    "tensor": {"tensor": -1},
    "fsdp_tensor": {"fsdp": -1, "tensor": 4},
}
DEFAULT_MESH = "fsdp"  # training: weights and optimizer state split, each layer's weights gathered when it runs
# Serving: weights split by heads, MLP width and vocabulary, so a decode step all-reduces activations and never
# gathers weights (under fsdp every decode step would all-gather every weight: a whole model's bytes per token).
SERVE_MESH = "tensor"


# ----------------------------------------------------------------------------------------------- meshes


def parse_mesh(spec: str) -> dict[str, int]:
    """'fsdp=4,tensor=2' -> {'fsdp': 4, 'tensor': 2}; a preset name gives its sizes; -1 = the remaining devices."""
    spec = spec.strip()
    if spec in PRESETS:
        return dict(PRESETS[spec])
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        name, sep, value = (s.strip() for s in part.partition("="))
        if not sep:
            raise ShardingError(
                f"bad mesh {spec!r}: {part.strip()!r} is not axis=size; write e.g. 'fsdp=4,tensor=2' "
                f"or a preset {sorted(PRESETS)}"
            )
        if name not in MESH_AXES:
            raise ShardingError(f"unknown mesh axis {name!r} in {spec!r}; the axes are {', '.join(MESH_AXES)}")
        if name in sizes:
            raise ShardingError(f"mesh axis {name!r} appears twice in {spec!r}")
        if not value.lstrip("-").isdigit():
            raise ShardingError(f"mesh axis {name!r} has size {value!r}; use a positive integer, or -1 for the rest")
        sizes[name] = int(value)
    return sizes


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Sizes of MESH_AXES (missing axes are 1, one -1 takes the rest), checked against the device count."""
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ShardingError(f"unknown mesh axis {unknown[0]!r}; the axes are {', '.join(MESH_AXES)}")
    shape = {a: sizes.get(a, 1) for a in MESH_AXES}
    for a, s in shape.items():
        if not isinstance(s, int) or (s < 1 and s != -1):
            raise ShardingError(f"mesh axis {a!r} has size {s!r}; use a positive integer, or -1 for the rest")
    free = [a for a, s in shape.items() if s == -1]
    if len(free) > 1:
        raise ShardingError(f"only one mesh axis may be -1, got {', '.join(free)}")
    fixed = math.prod(s for s in shape.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ShardingError(
                f"mesh {_describe(shape)}: the fixed axes need a multiple of {fixed} devices, "
                f"but there are {num_devices}"
            )
        shape[free[0]] = num_devices // fixed
    if math.prod(shape.values()) != num_devices:
        raise ShardingError(
            f"mesh {_describe(shape)} needs {math.prod(shape.values())} devices, but there are {num_devices}; "
            f"choose sizes whose product is {num_devices}, or -1 for one axis to take the rest"
        )
    return tuple(shape[a] for a in MESH_AXES)


def _describe(shape: Mapping[str, int]) -> str:
    return ",".join(f"{a}={s}" for a, s in shape.items() if s != 1) or "of one device"


def _sizes(spec: str | Mapping[str, int] | None) -> Mapping[str, int]:
    if spec is None:
        return PRESETS[DEFAULT_MESH]
    return parse_mesh(spec) if isinstance(spec, str) else spec


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all, on every host); default spec: fsdp over all.

    Axes are Auto (GSPMD): shardings are declared at jit boundaries and by `constrain`, XLA does the rest.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(_sizes(spec), len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def abstract_mesh(spec: str | Mapping[str, int] | None, num_devices: int) -> AbstractMesh:
    """The mesh `make_mesh` would build on `num_devices` devices, without devices (for planning memory)."""
    shape = mesh_shape(_sizes(spec), num_devices)
    return AbstractMesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# ------------------------------------------------------------------------------------------- parameters


def _is_param(x) -> bool:
    return isinstance(x, nnx.Variable)


def param_shardings(model: nnx.Module | nnx.State, mesh: Mesh | AbstractMesh) -> dict:
    """NamedSharding of every parameter, in the nested layout of `params_of(model)` / `checkpoint.load`.

    `model` may be abstract (`abstract_model(config)`): nothing is allocated.
    """
    state = model if isinstance(model, nnx.State) else nnx.state(model, nnx.Param)

    def one(path, param: nnx.Variable) -> NamedSharding:
        axes = param.get_metadata().get("logical_axes")
        if axes is None:
            raise ShardingError(f"parameter {jax.tree_util.keystr(path)} declares no logical_axes")
        try:
            return logical_sharding(axes, mesh, param.shape)
        except ShardingError as e:
            raise ShardingError(f"parameter {jax.tree_util.keystr(path)} {tuple(param.shape)}: {e}") from None

    return jax.tree.map_with_path(one, state, is_leaf=_is_param).to_pure_dict()


def init_sharded(
    config: GemmaConfig,
    mesh: Mesh,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    seed: int = 0,
) -> nnx.Module:
    """A randomly initialised Transformer created directly in its shardings (abstract init + jit out_shardings).

    Same values as `Transformer(config, rngs=nnx.Rngs(seed))` on one device; no device ever holds more
    than its shards.
    """
    abstract = transformer.abstract_model(config, dtype=dtype, param_dtype=param_dtype)

    def init() -> dict:
        model = transformer.Transformer(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))
        return transformer.params_of(model)

    params = jax.jit(init, out_shardings=param_shardings(abstract, mesh))()
    return nnx.merge(nnx.graphdef(abstract), params)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """The model with every parameter moved into its sharding (for a model built on one device)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state.to_pure_dict(), param_shardings(state, mesh)))


def init_optimizer(tx: optax.GradientTransformation, params, mesh: Mesh):
    """`tx.init(params)` created directly sharded: per-parameter state (Adam mu/nu, RMSProp nu) as its parameter,
    the rest (step counts) replicated. `params` (a dict or nnx.State) must already be placed.

    A plain `jax.jit(tx.init)` would not do: zeros depend on no input, so nothing propagates their sharding.
    """
    shardings = jax.tree.map(lambda x: x.sharding, params)
    replicated = NamedSharding(mesh, P())
    out = optax.tree_map_params(
        tx, lambda _, s: s, jax.eval_shape(tx.init, params), shardings, transform_non_params=lambda _: replicated
    )
    return jax.jit(tx.init, out_shardings=out)(params)


# --------------------------------------------------------------------------------------------- KV cache


def cache_shardings(cache: KVCache, mesh: Mesh | AbstractMesh) -> KVCache:
    """NamedSharding of every cache array: batch over data+fsdp, kv heads over tensor (replicated if indivisible)."""

    def layer(c: LayerCache) -> LayerCache:
        lead = ("layers",) * (c.positions.ndim - 2)  # stacked groups carry a leading [G]

        def scale(x: jax.Array | None) -> NamedSharding | None:  # an 8-bit cache's, split like its keys
            return None if x is None else logical_sharding((*lead, *kv_cache.SCALE_AXES), mesh, x.shape)

        return LayerCache(
            k=logical_sharding((*lead, *kv_cache.K_AXES), mesh, c.k.shape),
            v=logical_sharding((*lead, *kv_cache.V_AXES), mesh, c.v.shape),
            positions=logical_sharding((*lead, *kv_cache.POSITION_AXES), mesh, c.positions.shape),
            k_scale=scale(c.k_scale),
            v_scale=scale(c.v_scale),
        )

    return jax.tree.map(layer, cache, is_leaf=lambda x: isinstance(x, LayerCache))


def init_cache(config: GemmaConfig, batch: int, cache_length: int, dtype: str | jnp.dtype, mesh: Mesh) -> KVCache:
    """An empty KVCache created directly in its shardings (one compile per shape: a server creates one per
    admission)."""
    return _cache_initializer(config, batch, cache_length, kv_cache.cache_dtype(dtype), mesh)()


@functools.cache
def _cache_initializer(config: GemmaConfig, batch: int, cache_length: int, dtype: jnp.dtype, mesh: Mesh) -> Callable:
    """The jitted creator of one cache shape, kept: a new closure per call would be a new jit, traced again."""

    def create() -> KVCache:
        return KVCache.create(config, batch, cache_length, dtype)

    return jax.jit(create, out_shardings=cache_shardings(jax.eval_shape(create), mesh))


# ---------------------------------------------------------------------------------------------- forward


def jit_forward(model: nnx.Module, mesh: Mesh, *, donate_cache: bool = True) -> Callable:
    """`model(tokens, positions, mask, cache)` as a pure function of the parameters, jitted with explicit shardings.

    Returns forward(params, tokens, positions=None, mask=None, cache=None) -> (logits, cache), where `params`
    is `params_of(model)` as placed by `init_sharded`, `shard_model` or `checkpoint.load(shardings=...)`.
    Inputs may be numpy (the same on every host); they are placed over the batch axes. One compile per
    batch size, length and cache layout; the cache is donated so decode updates it in place.
    """
    graphdef = nnx.graphdef(model)
    params_sh = param_shardings(model, mesh)

    def apply(params, tokens, positions, mask, cache):
        return nnx.merge(graphdef, params)(tokens, positions, mask, cache)

    @functools.cache
    def compiled(logits_sh: NamedSharding, data_sh: NamedSharding, cache_treedef, cache_leaves: tuple):
        cache_sh = None if cache_treedef is None else jax.tree.unflatten(cache_treedef, cache_leaves)
        return jax.jit(
            apply,
            in_shardings=(params_sh, data_sh, data_sh, data_sh, cache_sh),
            out_shardings=(logits_sh, cache_sh),
            donate_argnums=(4,) if donate_cache and cache_sh is not None else (),
        )

    def forward(params: dict, tokens, positions=None, mask=None, cache: KVCache | None = None):
        b, t = np.shape(tokens)
        if mask is None:
            mask = np.ones((b, t), bool)
        if positions is None:
            positions = np.cumsum(np.asarray(mask), axis=1) - 1
        data_sh = logical_sharding(TOKENS, mesh, (b, t))
        logits_sh = logical_sharding(LOGITS, mesh, (b, t, model.config.vocab_size))
        cache_treedef, cache_leaves = None, ()
        if cache is not None:
            cache_sh = cache_shardings(cache, mesh)
            cache = jax.device_put(cache, cache_sh)
            cache_leaves, cache_treedef = jax.tree.flatten(cache_sh)
        tokens, positions, mask = jax.device_put((tokens, positions, mask), data_sh)
        fn = compiled(logits_sh, data_sh, cache_treedef, tuple(cache_leaves))
        with jax.set_mesh(mesh):
            return fn(params, tokens, positions, mask, cache)

    return forward


def on_mesh(mesh: Mesh | None):
    """`jax.set_mesh(mesh)`, or nothing without a mesh: one code path for sharded and single-device runs."""
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------- multi-host


def maybe_initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Join a multi-process JAX run when this is one; True if more than one process takes part.

    Explicit arguments win, then $JAX_COORDINATOR_ADDRESS / $JAX_NUM_PROCESSES / $JAX_PROCESS_ID, then
    JAX's own cluster detection (Cloud TPU VMs and pods, GKE, SLURM, Open MPI). With none of them this is a
    single-process run and nothing happens. Call it first, before any other JAX work.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if coordinator is not None or num_processes is not None or process_id is not None:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    else:
        try:
            jax.distributed.initialize()  # auto-detected clusters only
        except ValueError:  # no cluster found: nothing to join
            return False
        except RuntimeError as e:  # JAX already started in this process (a notebook, a test): too late to join
            log.warning("not joining a multi-host run: %s", e)
            return False
    return jax.process_count() > 1


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ShardingError(f"${name} should be an integer, got {value!r}") from None


def is_primary_host() -> bool:
    """True on process 0: print, log and write non-Orbax files there only (Orbax coordinates its own writes)."""
    return jax.process_index() == 0


def add_cli_args(parser: argparse.ArgumentParser, *, serving: bool = False) -> None:
    """Add --mesh and the multi-host flags to a CLI; `mesh_from_args` consumes them. `serving`: `--mesh` alone
    means tensor parallelism (SERVE_MESH), and its help says why."""
    group = parser.add_argument_group("sharding and multi-host")
    if serving:
        mesh = dict(
            nargs="?",
            const=SERVE_MESH,
            help=f"shard the model over this host's devices (default: one device). `--mesh` alone is {SERVE_MESH} "
            "parallelism over all of them: weights split by heads and MLP width, each decode step all-reduces "
            "activations and gathers no weight, the layout for serving; 'tensor' needs the kv heads divisible "
            "(else the cache is replicated), so for more devices than kv heads add data parallelism, e.g. "
            "'data=2,tensor=4'. fsdp all-gathers every weight on every decode step (a training layout). Sizes as "
            f"'data=2,tensor=4' (-1 = the rest) or a preset {sorted(PRESETS)}",
        )
    else:
        mesh = dict(
            help=f"devices per mesh axis, e.g. 'fsdp=4,tensor=2' (-1 = the rest), or a preset {sorted(PRESETS)} "
            f"(default: {DEFAULT_MESH} over all devices)"
        )
    group.add_argument("--mesh", default=None, **mesh)
    group.add_argument(
        "--coordinator", default=None, help="host:port of process 0 in a multi-host run ($JAX_COORDINATOR_ADDRESS)"
    )
    group.add_argument("--num-processes", type=int, default=None, help="processes in the run ($JAX_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int, default=None, help="this process, 0-based ($JAX_PROCESS_ID)")


def mesh_from_args(args: argparse.Namespace) -> Mesh:
    """Join the multi-host run if there is one, then build the mesh from --mesh (call before other JAX work)."""
    maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    return make_mesh(args.mesh)
