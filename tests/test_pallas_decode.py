"""The Pallas decode kernels (interpret mode on the CPU) equal blockwise.attend for one new token per row."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax import blockwise, kv_cache, pallas_decode
from gemma_jax.attention import dot_attention
from gemma_jax.kv_cache import EMPTY, LayerCache

B, N, K, H = 3, 4, 2, 16  # G = 2 query heads per kv head
SCALE, CAP = H**-0.5, 5.0  # a cap small enough to bend the scores
LAYERS, LAYER = 3, 1

KERNELS = {
    # Two splits, so rows spread over both and some splits get no block.
    "gpu": lambda *a, block, **kw: pallas_decode.decode_gpu(*a, block=block, splits=2, interpret=True, **kw),
    "tpu": lambda *a, block, **kw: pallas_decode.decode_tpu(*a, block=block, interpret=True, **kw),
}

# name: (q_pos per row (the decode token's position, already written), cache size, window, block, cap, stacked)
CASES = {
    # rows of different lengths, a free (EMPTY) row, and the last block shared with the one before (80 = 64 + 16)
    "ragged-free-row": ([13, EMPTY, 70], 80, None, 32, CAP, False),
    # fills of 32 (a block boundary) and one either side, in layer 1 of a stacked cache of 3 (a view)
    "block-boundary-stacked": ([31, 30, 32], 64, None, 16, CAP, True),
    # a sliding window in a ring of 32 slots: two rows wrapped, one not yet full; no cap
    "ring-wrapped": ([70, 40, 9], 32, 32, 16, None, False),
    # the last slot, the first slot only, one past a boundary; a window wider than the cache (short cache_length)
    "window-past-cache": ([95, 0, 64], 96, 128, 32, CAP, False),
}


def filled_cache(rng, q_pos, size, window, dtype, stacked):
    """A cache holding positions 0..q_pos of each row, written as one left-padded prefill (rings keep the last)."""
    t = max(max(q_pos) + 1, 1)
    positions = np.full((B, t), EMPTY, np.int32)
    for r, p in enumerate(q_pos):
        positions[r, t - p - 1 :] = np.arange(p + 1)
    lead = (LAYERS,) if stacked else ()
    # Other layers (and unwritten slots of a stacked cache) hold noise: reading them would show.
    fill = rng.standard_normal if stacked else np.zeros
    scaled = kv_cache.is_quantized(dtype)
    # An 8-bit cache's scales: noise of their own, so its keys and values equal a float32 cache's draws.
    scale_fill = np.random.default_rng(1).uniform if stacked else lambda size: np.zeros(size)
    scale_shape = (*lead, B, K, 1, size)
    cache = LayerCache(
        k=jnp.asarray(fill((*lead, B, K, H, size)), dtype),
        v=jnp.asarray(fill((*lead, B, K, size, H)), dtype),
        positions=jnp.full((*lead, B, size), EMPTY, jnp.int32),
        k_scale=jnp.asarray(scale_fill(size=scale_shape), jnp.float32) if scaled else None,
        v_scale=jnp.asarray(scale_fill(size=scale_shape), jnp.float32) if scaled else None,
    )
    if stacked:
        cache = cache.view(jnp.int32(LAYER))
    new_dtype = jnp.float32 if scaled else dtype  # 8-bit: float keys, quantized on write
    k, v = (jnp.asarray(rng.standard_normal((B, t, K, H)), new_dtype) for _ in range(2))
    return kv_cache.write(cache, k, v, jnp.asarray(positions), ring=window is not None)


def run(kernel, q_pos, size, window, block, cap, stacked, dtype=jnp.float32):
    rng = np.random.default_rng(0)
    cache = filled_cache(rng, q_pos, size, window, dtype, stacked)
    q = jnp.asarray(rng.standard_normal((B, N, H)) * 3, dtype)
    pos = jnp.asarray(q_pos, jnp.int32)
    got = KERNELS[kernel](q, pos, cache, window=window, scale=SCALE, cap=cap, block=block)
    none = jnp.zeros((B, 0, K, H), dtype)
    want = blockwise.attend(q[:, None], pos[:, None], none, none, cache, window=window, scale=SCALE, cap=cap)[:, 0]
    assert got.shape == q.shape and got.dtype == q.dtype
    return np.asarray(got, np.float32), np.asarray(want, np.float32)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name", CASES)
def test_kernel_equals_blockwise(kernel, name):
    got, want = run(kernel, *CASES[name])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    free = np.asarray(CASES[name][0]) == EMPTY
    assert not got[free].any()  # a free row attends to nothing


DEVICE_KERNEL = pallas_decode.backend_kernel(jax.default_backend())


@pytest.mark.skipif(DEVICE_KERNEL is None, reason="compiles the kernel for a GPU or TPU; this machine has neither")
@pytest.mark.parametrize("name", CASES)
def test_compiled_kernel_on_this_device(name, monkeypatch):
    """benchmarks/gpu_check.sh runs this where a GPU or TPU is lent: the kernel compiled, with its default blocks."""
    monkeypatch.setitem(KERNELS, "device", lambda *a, block, **kw: DEVICE_KERNEL(*a, **kw))
    got, want = run("device", *CASES[name])
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=2e-3)  # float32 dots may run as TF32 on a GPU


@pytest.mark.parametrize("kernel", KERNELS)
def test_bfloat16(kernel):
    got, want = run(kernel, [100, 5, 33], 64, 64, 16, CAP, False, dtype=jnp.bfloat16)
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)


def dense_on_dequantized(q, q_pos, cache: LayerCache, window, cap):
    """The dense reference (attention.dot_attention) over the whole 8-bit cache dequantized: [B, N, H]."""
    c = cache if cache.layer is None else jax.tree.map(lambda x: x[cache.layer], cache.stacked())
    k = c.k.astype(jnp.float32) * c.k_scale  # [B, K, H, S]
    v = c.v.astype(jnp.float32) * jnp.swapaxes(c.v_scale, -1, -2)  # [B, K, S, H]
    mask = blockwise.attention_mask(q_pos[:, None], c.positions, window)
    return dot_attention(q[:, None], k.transpose(0, 3, 1, 2), v.transpose(0, 2, 1, 3), mask, SCALE, cap)[:, 0]


# An 8-bit cache against a float32 one holding the same keys and values; outputs are averages of unit-normal
# values, so an absolute bound. Measured max |diff| over CASES and both kernels: int8 0.015, fp8 0.084.
LOOSE = {"int8": 0.03, "fp8": 0.15}


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name", CASES)
def test_8bit_cache(kernel, name, dtype):
    """Scales applied per key block inside the kernel equal dense attention over the dequantized cache."""
    check_8bit(kernel, name, dtype, atol=1e-5)


@pytest.mark.skipif(DEVICE_KERNEL is None, reason="compiles the kernel for a GPU or TPU; this machine has neither")
@pytest.mark.parametrize("dtype", ["int8", "fp8"])
@pytest.mark.parametrize("name", CASES)
def test_compiled_8bit_kernel_on_this_device(name, dtype, monkeypatch):
    """benchmarks/gpu_check.sh runs this where a GPU or TPU is lent: the kernel over an 8-bit cache, compiled."""
    monkeypatch.setitem(KERNELS, "device", lambda *a, block, **kw: DEVICE_KERNEL(*a, **kw))
    check_8bit("device", name, dtype, atol=2e-3)  # float32 dots may run as TF32 on a GPU


def check_8bit(kernel: str, name: str, dtype: str, atol: float) -> None:
    """KERNELS[kernel] over an 8-bit cache: within `atol` of the dense reference on the dequantized cache, zeros
    for a free row, and within LOOSE of the kernel over a float32 cache holding the same keys and values."""
    q_pos, size, window, block, cap, stacked = CASES[name]
    rng = np.random.default_rng(0)
    cache = filled_cache(rng, q_pos, size, window, kv_cache.cache_dtype(dtype), stacked)
    q = jnp.asarray(rng.standard_normal((B, N, H)) * 3, jnp.float32)
    pos = jnp.asarray(q_pos, jnp.int32)
    got = np.asarray(KERNELS[kernel](q, pos, cache, window=window, scale=SCALE, cap=cap, block=block))
    live = np.asarray(q_pos) != EMPTY
    want = np.asarray(dense_on_dequantized(q, pos, cache, window, cap))
    np.testing.assert_allclose(got[live], want[live], atol=atol, rtol=0)
    assert not got[~live].any()  # a free row attends to nothing
    exact, _ = run(kernel, *CASES[name])  # a float32 cache
    np.testing.assert_allclose(got, exact, atol=LOOSE[dtype], rtol=0)


def lowering_cache(dtype) -> LayerCache:
    """A stacked cache view at model-like shapes: 1000 slots (not a multiple of the block), head_dim 128."""
    scale = jnp.zeros((LAYERS, 2, 4, 1, 1000), jnp.float32) if kv_cache.is_quantized(dtype) else None
    return LayerCache(
        k=jnp.zeros((LAYERS, 2, 4, 128, 1000), dtype),
        v=jnp.zeros((LAYERS, 2, 4, 1000, 128), dtype),
        positions=jnp.zeros((LAYERS, 2, 1000), jnp.int32),
        k_scale=scale,
        v_scale=scale,
        layer=jnp.int32(LAYER),
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.int8, jnp.float8_e4m3fn])
@pytest.mark.parametrize(("backend", "marker"), [("gpu", "triton"), ("tpu", "tpu_custom_call")])
def test_lowers_for_its_backend(backend, marker, dtype):
    """Each kernel lowers for its platform (Triton IR / Mosaic) at model-like shapes, over a bf16 and an 8-bit
    cache; compiling needs the device."""
    cache = lowering_cache(dtype)
    kernel = pallas_decode.backend_kernel(backend)

    def f(q, q_pos, cache):
        return kernel(q, q_pos, cache, window=512, scale=0.1, cap=50.0)

    platform = {"gpu": "cuda"}.get(backend, backend)
    q, q_pos = jnp.zeros((2, 8, 128), jnp.bfloat16), jnp.zeros((2,), jnp.int32)
    lowered = jax.jit(f).trace(q, q_pos, cache).lower(lowering_platforms=(platform,))
    assert marker in lowered.as_text()


def test_backend_kernel():
    assert pallas_decode.backend_kernel("gpu") is pallas_decode.decode_gpu
    assert pallas_decode.backend_kernel("tpu") is pallas_decode.decode_tpu
    assert pallas_decode.backend_kernel("cpu") is None
    assert pallas_decode.backend_kernel("gpu", cache_size=pallas_decode.GPU_MIN_ROWS - 1) is None  # blockwise then
    assert pallas_decode.backend_kernel("tpu", cache_size=8) is pallas_decode.decode_tpu


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_model_decodes_with_the_backend_kernel(backend, monkeypatch, tiny_tokenizer):
    """Wired into the model: with the backend's kernel (interpret mode) chosen for every decode step, greedy
    sampling gives the portable path's tokens (ring wrap and a long row included)."""
    import functools

    from flax import nnx

    import gemma_jax as gj
    from gemma_jax.sampler import Sampler

    model = gj.Transformer(gj.gemma2_tiny(sliding_window=16), rngs=nnx.Rngs(0))
    prompts = [list(range(3, 40)), [2, 5, 9]]
    # A cache length of its own, so no earlier test's compiled decode step (without the kernel) is reused.
    want = Sampler(model, tiny_tokenizer, cache_length=77).generate(prompts, max_new_tokens=12)
    chosen = {}

    def backend_kernel(name, cache_size=None):
        chosen[cache_size] = True
        kernel = pallas_decode.KERNELS[backend]
        return functools.partial(kernel, interpret=True, **({"splits": 2} if backend == "gpu" else {}))

    monkeypatch.setattr(pallas_decode, "backend_kernel", backend_kernel)
    got = Sampler(model, tiny_tokenizer, cache_length=78 if backend == "gpu" else 79).generate(
        prompts, max_new_tokens=12
    )
    assert chosen  # the decode steps asked for a kernel
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
