"""KV cache: one preallocated buffer per layer, addressed by absolute token position.

Global layers keep `cache_length` slots (slot = position). Sliding-window layers keep a ring of
`sliding_window` slots (slot = position % window), which is all they can ever attend to: for the
9B model at 16k that is 3.5 GB per sequence instead of 5.6 GB. Every slot stores the position it
holds (-1 = empty), so masks come from positions and rows are independent: a server prefills a new
request into a one-row cache and copies it over a free row of the running batch (`sampler.insert`).

A row fills its slots from 0 upward (a ring wraps only once it is full), so the slots a batch
has written are `[0, filled_bound)`: attention reads those blocks and no more (see blockwise.py).

Layout: keys [B, K, H, S], values [B, K, S, H]. Both attention matmuls then batch over (B, K) with
plain (non-transposed) operands, q [G, H] x k [H, S] and p [G, S] x v [S, H], and a key block is one
slice. Measured on the 2-core CPU (2b attention shape, batch 8, one 512-slot block, float32, each
einsum jitted alone, best of 10): q.k^T took 9.6-14 ms with keys as
[B, K, S, H] and 10 ms as [B, S, K, H], against 1.4 ms as [B, K, H, S]; p.v took 1.3 ms as
[B, K, S, H] and 4.2 ms as [B, S, K, H]. XLA's CPU dot is slow when it must transpose an operand.

8-bit caches (`cache_dtype` "fp8" = float8_e4m3fn, or "int8") halve the bytes of a bf16 cache: 1.79 GB
(1.76 of values, 0.03 of scales) instead of 3.52 GB for the 9B at 16k. Each new key and value is quantized
on write, symmetric absmax per (row, kv head, slot) over head_dim, with float32 scales `k_scale` / `v_scale`
[B, K, 1, S] beside the values (slots last, as in the keys: a scale block is one lane-dense slice, on a TPU
too). Readers never dequantize the cache: the key scale multiplies the scores of its key, the value scale
the probability that weights its value (blockwise.py, pallas_decode.py). 16- and 32-bit caches have no
scales (None): nothing changes for them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from gemma_jax import quant
from gemma_jax.config import SLIDING, GemmaConfig

EMPTY = -1

# Logical axes of the cache arrays (the sharding rules map them to mesh axes).
K_AXES = ("batch", "kv_heads", "head_dim", "length")  # k [B, K, H, S]
V_AXES = ("batch", "kv_heads", "length", "head_dim")  # v [B, K, S, H]
POSITION_AXES = ("batch", "length")  # positions [B, S]
SCALE_AXES = ("batch", "kv_heads", None, "length")  # k_scale, v_scale [B, K, 1, S] of an 8-bit cache

# `cache_dtype` names -> dtypes. 8-bit ones are stored with per-token-per-head scales.
CACHE_DTYPES = {
    "bfloat16": jnp.dtype(jnp.bfloat16),
    "float32": jnp.dtype(jnp.float32),
    "float16": jnp.dtype(jnp.float16),
    "fp8": jnp.dtype(quant.FP8),
    "int8": jnp.dtype(quant.INT8),
}


def cache_dtype(dtype: str | jnp.dtype) -> jnp.dtype:
    """A cache dtype from its name in CACHE_DTYPES or a dtype among them; anything else raises ValueError
    naming the allowed values (an int32 or e5m2 cache would silently round keys away)."""
    found = CACHE_DTYPES.get(dtype) if isinstance(dtype, str) else None
    with contextlib.suppress(TypeError):
        found = found or next((d for d in CACHE_DTYPES.values() if d == jnp.dtype(dtype)), None)
    if found is None:
        raise ValueError(f"unknown cache dtype {dtype!r}; use one of {', '.join(CACHE_DTYPES)}")
    return found


def is_quantized(dtype: jnp.dtype) -> bool:
    """Whether a cache of `dtype` stores 8-bit values with scales."""
    return jnp.dtype(dtype).itemsize == 1


@struct.dataclass
class LayerCache:
    """One layer's keys/values. Stacked layers carry a leading [G] axis on every field.

    `layer` set (a scalar index) makes this a view of that layer of a stacked cache: reads and
    writes go to `[layer]` in place, so a scan over layers never slices out or re-stacks a copy.
    """

    k: jax.Array  # [B, K, H, S]
    v: jax.Array  # [B, K, S, H]
    positions: jax.Array  # [B, S] int32, absolute position in each slot, EMPTY if none
    k_scale: jax.Array | None = None  # [B, K, 1, S] float32, 8-bit caches only: key = k * k_scale
    v_scale: jax.Array | None = None  # [B, K, 1, S] float32, 8-bit caches only: value = v * v_scale
    layer: jax.Array | None = None  # [] int32: index into the leading [G] axis of a stacked cache

    @property
    def size(self) -> int:
        return self.positions.shape[-1]

    def view(self, layer: jax.Array) -> LayerCache:
        """Layer `layer` of this stacked cache, read and written in place."""
        return dataclasses.replace(self, layer=layer)

    def stacked(self) -> LayerCache:
        """The whole stacked cache behind a view."""
        return dataclasses.replace(self, layer=None)


@struct.dataclass
class KVCache:
    """Caches for the scanned groups (one LayerCache per pattern slot, stacked over groups) and the tail."""

    groups: tuple[LayerCache, ...]
    tail: tuple[LayerCache, ...]

    @classmethod
    def create(cls, config: GemmaConfig, batch: int, cache_length: int, dtype: str | jnp.dtype) -> KVCache:
        """An empty cache for `batch` sequences of up to `cache_length` tokens; `dtype` as `cache_dtype` takes it."""
        if cache_length <= 0:
            raise ValueError(f"cache_length must be positive, got {cache_length}")
        dtype = cache_dtype(dtype)
        scaled = is_quantized(dtype)

        def layer(kind: str, lead: tuple[int, ...]) -> LayerCache:
            size = min(config.sliding_window, cache_length) if kind == SLIDING else cache_length
            heads = (*lead, batch, config.num_kv_heads)
            return LayerCache(
                k=jnp.zeros((*heads, config.head_dim, size), dtype),
                v=jnp.zeros((*heads, size, config.head_dim), dtype),
                positions=jnp.full((*lead, batch, size), EMPTY, jnp.int32),
                k_scale=jnp.zeros((*heads, 1, size), jnp.float32) if scaled else None,
                v_scale=jnp.zeros((*heads, 1, size), jnp.float32) if scaled else None,
            )

        pattern = config.layer_pattern
        return cls(
            groups=tuple(layer(kind, (config.num_groups,)) for kind in pattern) if config.num_groups else (),
            tail=tuple(layer(kind, ()) for kind in pattern[: config.num_tail_layers]),
        )

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))


def filled_bound(cache: LayerCache, positions: jax.Array) -> jax.Array:
    """[] int32: every slot a query at `positions` [B, T] may need lies below this bound.

    Slots fill from 0 upward, so a row whose newest position is p has written slots [0, p] only
    (a ring: all of them once p >= size). Rows that are free (all EMPTY) need nothing.
    """
    return jnp.minimum(jnp.max(positions) + 1, cache.size).astype(jnp.int32)


class Block(NamedTuple):
    """Slots of a cache as `read` returns them; the scales [B, K, 1, size] are None unless it is 8-bit."""

    k: jax.Array  # [B, K, H, size]
    v: jax.Array  # [B, K, size, H]
    positions: jax.Array  # [B, size]
    k_scale: jax.Array | None
    v_scale: jax.Array | None


def read(cache: LayerCache, start: jax.Array, size: int) -> Block:
    """Slots [start, start + size) of every array of the cache, as stored (8-bit values stay 8-bit)."""

    def take(x: jax.Array, slot_axis: int) -> jax.Array:
        # One dynamic_slice (the view's layer and the slot range together), so nothing larger is copied.
        starts = [jnp.zeros((), jnp.int32)] * x.ndim
        sizes = list(x.shape)
        starts[slot_axis], sizes[slot_axis] = start, size
        if cache.layer is not None:
            starts[0], sizes[0] = cache.layer, 1
        block = jax.lax.dynamic_slice(x, starts, sizes)
        return block if cache.layer is None else block[0]

    def scale(x: jax.Array | None) -> jax.Array | None:
        return None if x is None else take(x, -1)

    return Block(
        take(cache.k, -1), take(cache.v, -2), take(cache.positions, -1), scale(cache.k_scale), scale(cache.v_scale)
    )


def write(cache: LayerCache, k: jax.Array, v: jax.Array, positions: jax.Array, ring: bool) -> LayerCache:
    """Store new k/v [B, T, K, H] at their positions [B, T] (EMPTY = padding, not stored); an 8-bit cache
    stores them quantized per (row, token, kv head), with their scales.

    A ring keeps only each row's last `size` new tokens, so no two writes hit the same slot.
    Positions past a global cache's end are dropped; the sampler refuses prompts that would need them.
    """
    size = cache.size
    keep = positions >= 0
    if ring:
        last = jnp.max(positions, axis=1, keepdims=True)  # [B, 1]
        keep &= positions > last - size
        slots = positions % size
    else:
        slots = positions
    slots = jnp.where(keep, slots, size)  # out of range -> dropped by the scatter
    rows = jnp.arange(positions.shape[0])[:, None]  # [B, 1]
    lead = () if cache.layer is None else (cache.layer,)
    # k [(G,) B, K, H, S] at (layer, rows, :, :, slots) and v [(G,) B, K, S, H] at (layer, rows, :, slots):
    # both updates are [B, T, K, H], the projections' own shape; scales [(G,) B, K, 1, S] take [B, T, K].
    scales = {}
    if cache.k_scale is not None:
        qk, qv = quant.quantize(k, 1, cache.k.dtype), quant.quantize(v, 1, cache.v.dtype)  # scales [B, T, K]
        k, v = qk.values, qv.values
        at = (*lead, rows, slice(None), 0, slots)
        scales = dict(
            k_scale=cache.k_scale.at[at].set(qk.scale, mode="drop"),
            v_scale=cache.v_scale.at[at].set(qv.scale, mode="drop"),
        )
    return dataclasses.replace(
        cache,
        k=cache.k.at[(*lead, rows, slice(None), slice(None), slots)].set(k.astype(cache.k.dtype), mode="drop"),
        v=cache.v.at[(*lead, rows, slice(None), slots)].set(v.astype(cache.v.dtype), mode="drop"),
        positions=cache.positions.at[(*lead, rows, slots)].set(positions, mode="drop"),
        **scales,
    )
