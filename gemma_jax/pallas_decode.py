"""Pallas decode attention (T = 1) over a LayerCache: each row reads only its own filled key blocks.

`blockwise.attend` loops to the batch's largest fill, so one long row makes every row read that far.
These kernels bound each row by its own length, min(q_pos + 1, size) (slots fill from 0 upward, see
kv_cache.py), and skip rows whose q_pos is EMPTY (their output is zeros). The math is blockwise.attend's
for T = 1: masks from the stored positions (present, causal, sliding window `k > q - window`), scores
scaled then soft-capped, float32 scores, softmax and accumulation whatever the dtype, p cast to the value
dtype for the p.v product. Query head n reads kv head n // G (G = N / K). A stacked cache view is read at
its layer in place: the kernels take the stacked arrays and the layer index, never a sliced copy.

Two kernels, both also run in interpret mode (`interpret=True`) on any backend:

- `decode_gpu`, Pallas on Triton: grid (B, K, splits). Relies on `pl.load` of dynamic slices (`pl.ds`),
  a `lax.fori_loop` with run-time bounds (the row's blocks in this split), scalar refs (q_pos, layer),
  dots with M = G padded to 16 rows (Triton's minimum), and power-of-2 blocks. Each split writes a
  partial (max, sum, weighted values) that plain JAX combines (flash-decoding).
- `decode_tpu`, Pallas on Mosaic: grid (B, K, key blocks) with `PrefetchScalarGridSpec` (q_pos and the
  layer index in SMEM), BlockSpec index_maps that clamp blocks past the row's length to its last needed
  block (a repeated block index issues no DMA), `pl.when` to skip their compute, and m / l / acc scratch
  in VMEM carried across the "arbitrary" key-block axis.

An 8-bit cache (kv_cache.py) is read as stored: each block's 8-bit keys and values are upcast to q's dtype
inside the kernel, the key scales [1, block] multiply that block's scores and the value scales its
probabilities before p.v, as in blockwise.attend; the scale arrays are read block by block like the keys.

`backend_kernel` picks the kernel for a `jax.default_backend()` name (None where there is none).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from gemma_jax.blockwise import MASKED, softcap
from gemma_jax.kv_cache import LayerCache

Kernel = Callable[..., jax.Array]

GPU_BLOCK, GPU_SPLITS, GPU_MIN_ROWS = 64, 8, 16
TPU_BLOCK = 512  # a multiple of 128 (the lane width), or the whole cache when it is smaller


def _online_softmax(m, l, acc, s, mask, v, v_scale=None):
    """Fold one block's float32 scores s [G, S] (mask [G or 1, S]) and values v [S, H] into (m, l, acc);
    `v_scale` [1, S]: the values' scales (8-bit cache), applied to the probabilities."""
    s = jnp.where(mask, s, MASKED)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)  # a masked key adds nothing, even in an all-masked row
    correction = jnp.exp(m - m_new)
    weights = p if v_scale is None else p * v_scale
    pv = jnp.dot(weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l * correction + jnp.sum(p, axis=-1, keepdims=True), acc * correction + pv


def _key_mask(k_pos, q_pos, window):
    """True where the query at q_pos sees the key at k_pos (blockwise.attention_mask for one query)."""
    mask = (k_pos >= 0) & (k_pos <= q_pos)
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def _split_heads(q: jax.Array, cache: LayerCache) -> jax.Array:
    """q [B, N, H] -> [B, K, G, H] in the dtype both dots use (q's and the cache's, promoted; q's for 8 bits)."""
    b, n, h = q.shape
    kv_heads = cache.k.shape[-3]
    dtype = q.dtype if cache.k_scale is not None else jnp.promote_types(q.dtype, cache.k.dtype)
    return q.reshape(b, kv_heads, n // kv_heads, h).astype(dtype)


def _gpu_kernel(*refs, size, block, splits, window, scale, cap, stacked, quantized):
    refs = list(refs)
    # indexes the stacked refs in the same load (Triton takes one indexer)
    lead = (refs.pop(0)[()],) if stacked else ()
    q_pos_ref, q_ref, k_ref, v_ref, pos_ref = refs[:5]
    ks_ref, vs_ref = refs[5:7] if quantized else (None, None)
    o_ref, m_ref, l_ref = refs[-3:]
    q_pos = q_pos_ref[()]
    q = q_ref[...]  # [Gp, H]
    split = pl.program_id(2)
    blocks = pl.cdiv(jnp.clip(q_pos + 1, 0, size), block)
    per_split = pl.cdiv(blocks, splits)
    lo = split * per_split
    hi = jnp.minimum(lo + per_split, blocks)

    def body(i, carry):
        # A last block that would run past the end is read from size - block; slots it shares with the
        # block before are masked (as in blockwise.attend), so no load goes out of bounds.
        start = jnp.minimum(i * block, size - block)
        cols = pl.ds(start, block)
        k = plgpu.load(k_ref.at[(*lead, slice(None), cols)])  # [H, block]
        v = plgpu.load(v_ref.at[(*lead, cols, slice(None))])  # [block, H]
        k_pos = plgpu.load(pos_ref.at[(*lead, cols)])  # [block]
        fresh = start + jnp.arange(block) >= i * block
        mask = (fresh & _key_mask(k_pos, q_pos, window))[None, :]
        s = jnp.dot(q, k.astype(q.dtype), preferred_element_type=jnp.float32)
        if not quantized:
            return _online_softmax(*carry, softcap(s * scale, cap), mask, v)
        k_scale = plgpu.load(ks_ref.at[(*lead, slice(None), cols)])  # [1, block]
        v_scale = plgpu.load(vs_ref.at[(*lead, slice(None), cols)])
        return _online_softmax(*carry, softcap(s * (scale * k_scale), cap), mask, v.astype(q.dtype), v_scale)

    rows = q.shape[0]
    carry = (
        jnp.full((rows, 1), MASKED, jnp.float32),
        jnp.zeros((rows, 1), jnp.float32),
        jnp.zeros(q.shape, jnp.float32),
    )
    m, l, acc = jax.lax.fori_loop(lo, hi, body, carry)
    o_ref[...] = acc
    m_ref[...] = m[:, 0]
    l_ref[...] = l[:, 0]


@functools.partial(
    jax.jit, static_argnames=("window", "scale", "cap", "block", "splits", "num_warps", "num_stages", "interpret")
)
def decode_gpu(
    q: jax.Array,  # [B, N, H]
    q_pos: jax.Array,  # [B] int32, EMPTY on free rows
    cache: LayerCache,
    *,
    window: int | None,
    scale: float,
    cap: float | None,
    block: int = GPU_BLOCK,
    splits: int = GPU_SPLITS,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:
    """Decode attention on GPU (Pallas Triton): [B, N, H] in q's dtype.

    Each (row, kv head) splits its own filled blocks over `splits` programs, so a short batch still fills
    the GPU; `block` (keys per step) must be a power of 2 >= 16, and shrinks to fit a small cache.
    """
    size = cache.size
    block = min(block, 1 << (size.bit_length() - 1))  # a power of 2 no larger than the cache
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of 2 >= 16 that fits the cache ({size} slots), got {block}")
    q4 = _split_heads(q, cache)
    b, kv_heads, g, h = q4.shape
    rows = max(GPU_MIN_ROWS, 1 << (g - 1).bit_length())  # the dot's M: a power of 2, at least 16
    q4 = jnp.pad(q4, ((0, 0), (0, 0), (0, rows - g), (0, 0)))

    stacked = cache.layer is not None
    lead = (cache.k.shape[0],) if stacked else ()
    zeros = (0,) * len(lead)
    quantized = cache.k_scale is not None
    kernel = functools.partial(
        _gpu_kernel,
        size=size,
        block=block,
        splits=splits,
        window=window,
        scale=scale,
        cap=cap,
        stacked=stacked,
        quantized=quantized,
    )
    in_specs = [
        pl.BlockSpec((None,), lambda r, kh, s: (r,)),  # q_pos: a scalar
        pl.BlockSpec((None, None, rows, h), lambda r, kh, s: (r, kh, 0, 0)),
        # The whole cache of this (row, kv head), every layer of a stacked one: the kernel indexes the layer.
        pl.BlockSpec((*lead, None, None, h, size), lambda r, kh, s: (*zeros, r, kh, 0, 0)),
        pl.BlockSpec((*lead, None, None, size, h), lambda r, kh, s: (*zeros, r, kh, 0, 0)),
        pl.BlockSpec((*lead, None, size), lambda r, kh, s: (*zeros, r, 0)),
    ]
    args = [q_pos.astype(jnp.int32), q4, cache.k, cache.v, cache.positions]
    if quantized:  # the scales [(G,) B, K, 1, S] of this (row, kv head), like the keys
        in_specs += [pl.BlockSpec((*lead, None, None, 1, size), lambda r, kh, s: (*zeros, r, kh, 0, 0))] * 2
        args += [cache.k_scale, cache.v_scale]
    if stacked:
        in_specs.insert(0, pl.BlockSpec((), lambda r, kh, s: ()))
        args.insert(0, jnp.asarray(cache.layer, jnp.int32))
    part = (splits, b, kv_heads, rows)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(b, kv_heads, splits),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, None, rows, h), lambda r, kh, s: (s, r, kh, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda r, kh, s: (s, r, kh, 0)),
            pl.BlockSpec((None, None, None, rows), lambda r, kh, s: (s, r, kh, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((*part, h), jnp.float32),
            jax.ShapeDtypeStruct(part, jnp.float32),
            jax.ShapeDtypeStruct(part, jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="gemma_decode_attention",
    )(*args)

    # Combine the splits' partial softmaxes; a split with no keys has m = MASKED and l = acc = 0.
    m_all = jnp.max(m, axis=0)
    weight = jnp.exp(m - m_all)
    l = jnp.sum(l * weight, axis=0)
    acc = jnp.sum(acc * weight[..., None], axis=0)
    out = acc / jnp.where(l == 0, 1.0, l)[..., None]  # a free row gives zeros
    return out[:, :, :g].reshape(q.shape).astype(q.dtype)


def _tpu_kernel(q_pos_ref, layer_ref, q_ref, k_ref, v_ref, pos_ref, *refs, size, block, window, scale, cap, quantized):
    del layer_ref  # used by the index maps only
    ks_ref, vs_ref = refs[:2] if quantized else (None, None)  # the scales of an 8-bit cache
    o_ref, m_sc, l_sc, acc_sc = refs[-4:]
    row, j = pl.program_id(0), pl.program_id(2)
    q_pos = q_pos_ref[row]

    @pl.when(j == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, MASKED, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j * block < jnp.clip(q_pos + 1, 0, size))
    def _():
        q = q_ref[...]  # [G, H]
        s = jnp.dot(q, k_ref[...].astype(q.dtype), preferred_element_type=jnp.float32)  # [G, block]
        k_pos = pos_ref[pl.ds(row, 1), :]  # [1, block]
        slot = j * block + jax.lax.broadcasted_iota(jnp.int32, k_pos.shape, 1)
        inside = slot < size
        mask = inside & _key_mask(k_pos, q_pos, window)
        v = v_ref[...]  # [block, H]
        if size % block:  # the last block runs past the cache: its padding may hold anything, NaN included
            slot_rows = j * block + jax.lax.broadcasted_iota(jnp.int32, (block, 1), 0)
            v = jnp.where(slot_rows < size, v, jnp.zeros_like(v))
        v_scale = None
        if quantized:  # 8-bit: [1, block] scales per key; padding's scale is zeroed like its values
            s, v = s * (scale * ks_ref[...]), v.astype(q.dtype)
            v_scale = jnp.where(inside, vs_ref[...], 0.0)
        else:
            s = s * scale
        m_sc[...], l_sc[...], acc_sc[...] = _online_softmax(
            m_sc[...], l_sc[...], acc_sc[...], softcap(s, cap), mask, v, v_scale
        )

    @pl.when(j == pl.num_programs(2) - 1)
    def _():
        l = l_sc[...]
        o_ref[...] = (acc_sc[...] / jnp.where(l == 0, 1.0, l)).astype(o_ref.dtype)  # a free row gives zeros


@functools.partial(jax.jit, static_argnames=("window", "scale", "cap", "block", "interpret"))
def decode_tpu(
    q: jax.Array,  # [B, N, H]
    q_pos: jax.Array,  # [B] int32, EMPTY on free rows
    cache: LayerCache,
    *,
    window: int | None,
    scale: float,
    cap: float | None,
    block: int = TPU_BLOCK,
    interpret: bool = False,
) -> jax.Array:
    """Decode attention on TPU (Pallas Mosaic): [B, N, H] in q's dtype.

    Grid steps past a row's last block keep that block's index, so Pallas issues no copy for them, and
    skip their compute. On a TPU `block` must be a multiple of 128 unless the cache is smaller.
    """
    size = cache.size
    block = min(block, size)
    q4 = _split_heads(q, cache)
    b, kv_heads, g, h = q4.shape
    stacked = cache.layer is not None
    layer = jnp.reshape(jnp.asarray(0 if cache.layer is None else cache.layer, jnp.int32), (1,))

    def key_block(row, j, q_pos_ref):
        """Block j, clamped to the row's last needed block (block 0 for a free row)."""
        last = pl.cdiv(jnp.clip(q_pos_ref[row] + 1, 0, size), block) - 1
        return jnp.minimum(j, jnp.maximum(last, 0))

    def lead(layer_ref):
        return (layer_ref[0],) if stacked else ()

    squeeze = (None,) if stacked else ()
    in_specs = [
        pl.BlockSpec((None, None, g, h), lambda r, kh, j, qp, ly: (r, kh, 0, 0)),
        pl.BlockSpec(
            (*squeeze, None, None, h, block), lambda r, kh, j, qp, ly: (*lead(ly), r, kh, 0, key_block(r, j, qp))
        ),
        pl.BlockSpec(
            (*squeeze, None, None, block, h), lambda r, kh, j, qp, ly: (*lead(ly), r, kh, key_block(r, j, qp), 0)
        ),
        # Positions of every row (a [1, block] tile breaks TPU tiling); the kernel reads its own row.
        pl.BlockSpec((*squeeze, b, block), lambda r, kh, j, qp, ly: (*lead(ly), 0, key_block(r, j, qp))),
    ]
    args = [q_pos.astype(jnp.int32), layer, q4, cache.k, cache.v, cache.positions]
    quantized = cache.k_scale is not None
    if quantized:  # scales [(G,) B, K, 1, S]: a lane-dense [1, block] tile per key block

        def scale_block(r, kh, j, qp, ly):
            return (*lead(ly), r, kh, 0, key_block(r, j, qp))

        in_specs += [pl.BlockSpec((*squeeze, None, None, 1, block), scale_block)] * 2
        args += [cache.k_scale, cache.v_scale]
    kernel = functools.partial(
        _tpu_kernel, size=size, block=block, window=window, scale=scale, cap=cap, quantized=quantized
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, kv_heads, pl.cdiv(size, block)),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((None, None, g, h), lambda r, kh, j, qp, ly: (r, kh, 0, 0)),
            scratch_shapes=[
                pltpu.VMEM((g, 1), jnp.float32),
                pltpu.VMEM((g, 1), jnp.float32),
                pltpu.VMEM((g, h), jnp.float32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct(q4.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="gemma_decode_attention",
    )(*args)
    return out.reshape(q.shape)


KERNELS: dict[str, Kernel] = {"gpu": decode_gpu, "tpu": decode_tpu}


def backend_kernel(backend: str, cache_size: int | None = None) -> Kernel | None:
    """The decode kernel for a `jax.default_backend()` name and a cache of `cache_size` slots, or None (use
    blockwise.attend): the GPU kernel needs at least GPU_MIN_ROWS slots (its smallest power-of-2 block)."""
    if backend == "gpu" and cache_size is not None and cache_size < GPU_MIN_ROWS:
        return None
    return KERNELS.get(backend)
