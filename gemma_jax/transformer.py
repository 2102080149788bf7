"""The Gemma 2 and 3 decoder: embed, scan over stacked layer groups, final norm, tied and softcapped logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_jax.block import LayerGroup
from gemma_jax.blockwise import softcap
from gemma_jax.config import GemmaConfig
from gemma_jax.embedder import Embedder
from gemma_jax.kv_cache import EMPTY, KVCache
from gemma_jax.norm import RMSNorm


class Transformer(nnx.Module):
    """Gemma 2 or 3 causal LM (Gemma 3 adds q/k norms and per-kind RoPE, set by the config).

    Layers are stored as `groups`: one LayerGroup per period of `config.layer_pattern`
    (sliding, global), stacked on a leading axis and run with `lax.scan`, so compile time does not
    grow with depth. Layers left over after the last whole period (odd layer counts) live in `tail`.
    Parameters are stored in `param_dtype` and computed in `dtype`; norms, softmax and the final
    softcap run in float32 whatever `dtype` is.
    """

    def __init__(
        self,
        config: GemmaConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = dtype
        # Training sets this: each scanned group is recomputed in the backward pass (activation
        # memory of one group instead of all of them).
        self.remat = False
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embedder = Embedder(config.vocab_size, config.hidden_size, rngs=rngs, **kw)

        @nnx.split_rngs(splits=max(config.num_groups, 1))
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: None, "logical_axes": "layers"})
        def make_groups(rngs: nnx.Rngs) -> LayerGroup:
            return LayerGroup(config, config.layer_pattern, rngs=rngs, **kw)

        self.groups = make_groups(rngs) if config.num_groups else None
        tail_kinds = config.layer_pattern[: config.num_tail_layers]
        self.tail = LayerGroup(config, tail_kinds, rngs=rngs, **kw) if tail_kinds else None
        self.final_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)

    def __call__(
        self,
        tokens: jax.Array,  # [B, T] int
        positions: jax.Array | None = None,  # [B, T] int, absolute position of each token
        mask: jax.Array | None = None,  # [B, T] bool, False on padding
        cache: KVCache | None = None,
        *,
        last_only: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        """Logits [B, T, V] (float32) and, when a cache is given, the cache with these tokens stored.

        Defaults: mask all True; positions count the unmasked tokens of each row from 0, which is
        what a left-padded batch needs. With a cache, pass the true positions (after the cached ones).
        `last_only` returns the last column's logits [B, 1, V] only: a prefill needs no more, and
        [B, T, V] float32 logits of a long chunk would dwarf its activations.
        """
        if mask is None:
            mask = jnp.ones(tokens.shape, bool)
        if positions is None:
            positions = jnp.cumsum(mask, axis=1) - 1
        positions = jnp.where(mask, positions, EMPTY).astype(jnp.int32)

        x = self.embedder.encode(tokens)  # [B, T, D]
        group_caches = tail_caches = None
        if isinstance(self.groups, nnx.List):  # split by `split_groups`
            x, group_caches = self._loop_groups(x, positions, None if cache is None else cache.groups)
        elif self.groups is not None:
            x, group_caches = self._scan_groups(x, positions, None if cache is None else cache.groups)
        if self.tail is not None:
            x, tail_caches = self.tail(x, positions, None if cache is None else cache.tail)
        x = self.final_norm(x[:, -1:] if last_only else x)
        logits = softcap(self.embedder.decode(x), self.config.final_logit_softcap)  # float32
        if cache is None:
            return logits, None
        return logits, KVCache(groups=group_caches or (), tail=tail_caches or ())

    def _scan_groups(self, x, positions, caches):
        """Run the stacked groups with `lax.scan`. Weights are scanned over; a cache rides in the carry and
        each group reads and writes its layer in place (a view), so no step slices out or re-stacks a copy."""
        graphdef, state = nnx.split(self.groups)

        def body(carry, xs):
            group_state, index = xs
            return _run_group(nnx.merge(graphdef, group_state), index, *carry, positions), None

        if self.remat:
            body = jax.checkpoint(body)
        xs = (state, jnp.arange(self.config.num_groups, dtype=jnp.int32))
        (x, caches), _ = jax.lax.scan(body, (x, caches), xs)
        return x, caches

    def _loop_groups(self, x, positions, caches):
        """Run groups held apart (`split_groups`) one after another; each reads and writes its layer of the
        stacked cache in place, as in the scan."""
        for index, group in enumerate(self.groups):
            x, caches = _run_group(group, jnp.int32(index), x, caches, positions)
        return x, caches


def _run_group(group: LayerGroup, index: jax.Array, x, caches, positions):
    """Group `index` on x, reading and writing its layer of the stacked caches in place (a view)."""
    views = None if caches is None else tuple(c.view(index) for c in caches)
    x, views = group(x, positions, views)
    return x, None if views is None else tuple(c.stacked() for c in views)


def split_groups(model: Transformer) -> Transformer:
    """The same model (sharing every other array) with its stacked groups copied apart into one LayerGroup per
    group, run by a Python loop instead of a scan: for an inference loop on XLA:CPU.

    XLA's CPU dot cannot read a slice of a stacked weight in place: inside a loop of decode steps, a scanned
    (or unrolled) stack copies every layer's weights out of the stack on every step, which triples the weight
    traffic of a step (measured: 2b shape, 4 layers, float32, batch 1, 185 of 250 ms a step were these
    copies). Held apart, the weights are read where they lie. The cost is a copy of the layer weights and a
    compile that grows with depth.
    """
    if model.groups is None or isinstance(model.groups, nnx.List):
        return model
    split = nnx.clone(model)  # a new module tree over the same arrays
    group_def, group_state = nnx.split(model.groups)
    split.groups = nnx.List(
        nnx.merge(group_def, jax.tree.map(lambda w, i=i: _layer(w, i), group_state))
        for i in range(model.config.num_groups)
    )
    return split


def _layer(stacked: jax.Array | jax.ShapeDtypeStruct, index: int) -> jax.Array | jax.ShapeDtypeStruct:
    """Entry `index` of a stacked weight; the shape alone for an abstract model."""
    if isinstance(stacked, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(stacked.shape[1:], stacked.dtype)
    return stacked[index]


def abstract_model(config: GemmaConfig, *, dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32):
    """The model with ShapeDtypeStruct leaves: shapes, dtypes and logical axes, nothing allocated."""
    return nnx.eval_shape(lambda: Transformer(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))


def from_params(
    config: GemmaConfig,
    params: dict,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype | None = None,
) -> Transformer:
    """A model holding `params` (our nested layout, e.g. from `params.from_hf_state_dict`) without a random init.

    `param_dtype` defaults to the dtype of the embedding in `params`; every leaf is cast to it.
    """
    if param_dtype is None:
        param_dtype = jnp.asarray(params["embedder"]["embedding"]).dtype
    return with_params(abstract_model(config, dtype=dtype, param_dtype=param_dtype), params)


def with_params(abstract: Transformer, params: dict) -> Transformer:
    """`abstract` (from `abstract_model` or `fp8.abstract_model`) holding `params`, each cast to its leaf's dtype."""
    graphdef, state = nnx.split(abstract)
    expected = state.to_pure_dict()
    _check_tree(expected, params)
    state.replace_by_pure_dict(jax.tree.map(lambda a, x: jnp.asarray(x, a.dtype), expected, params))
    return nnx.merge(graphdef, state)


def params_of(model: Transformer) -> dict:
    """The model's parameters as a plain nested dict of arrays (the layout `params.py` maps)."""
    return nnx.state(model, nnx.Param).to_pure_dict()


def _check_tree(expected: dict, given: dict, path: str = "") -> None:
    """Name the first missing key or shape mismatch instead of failing inside a tree_map."""
    if not isinstance(given, dict):
        raise ValueError(f"params at {path or '<root>'!r} should be a dict, got {type(given).__name__}")
    for key in set(expected) | set(given):
        where = f"{path}.{key}" if path else str(key)
        if key not in given:
            raise ValueError(f"params missing {where!r}")
        if key not in expected:
            raise ValueError(f"params have unexpected entry {where!r}")
        e, g = expected[key], given[key]
        if isinstance(e, dict):
            _check_tree(e, g, where)
        elif tuple(e.shape) != tuple(jnp.shape(g)):
            raise ValueError(f"params {where!r} has shape {tuple(jnp.shape(g))}, expected {tuple(e.shape)}")
