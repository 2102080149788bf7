"""8-bit KV cache (fp8, int8): bytes, quantization on write, the model through it, the Sampler, insert and the CLIs.

Attention over an 8-bit cache is tested against the dense reference in test_blockwise.py (portable path) and
test_pallas_decode.py (both kernels); its shardings in test_sharding.py.
"""

from __future__ import annotations

import argparse
import pathlib
import runpy
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import left_padded
from flax import nnx
from test_fp8 import random_params

import gemma_jax as gj
from gemma_jax import checkpoint, kv_cache, sample
from gemma_jax import sampler as sampler_lib
from gemma_jax.sampler import Sampler

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = gj.gemma2_tiny(sliding_window=16, num_layers=3)  # a ring, a scanned group and a tail layer
EIGHT_BITS = ["int8", "fp8"]


@pytest.fixture(scope="module")
def spread_model() -> gj.Transformer:
    """Weights spread like the HF oracle's in conftest: logits up to ~24, so errors show."""
    return gj.from_params(CONFIG, random_params(CONFIG))


@pytest.fixture(scope="module")
def model(spread_model) -> gj.Transformer:
    """A small embedding so greedy text varies (see test_sampler.models)."""
    params = gj.params_of(spread_model)
    params["embedder"]["embedding"] = np.random.default_rng(1).normal(0, 0.05, (CONFIG.vocab_size, CONFIG.hidden_size))
    return gj.from_params(CONFIG, params)


def nbytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("dtype", EIGHT_BITS)
def test_cache_bytes_are_half_of_bf16_plus_scales(dtype):
    """9B, one sequence of 16k: keys and values take half the bytes of bf16 (1.75 GB instead of 3.5 GB), plus a
    float32 scale per (token, kv head) for each; on a real cache too, through `KVCache.nbytes`."""
    bf16 = jax.eval_shape(lambda: gj.KVCache.create(gj.gemma2_9b(), 1, 16384, jnp.bfloat16))
    small = jax.eval_shape(lambda: gj.KVCache.create(gj.gemma2_9b(), 1, 16384, dtype))
    slots_x_heads = 21 * (16384 + 4096) * 8  # 21 (sliding, global) pairs x slots x kv heads
    kv = [(c.k, c.v) for c in small.groups]
    scales = [(c.k_scale, c.v_scale) for c in small.groups]
    assert nbytes(kv) == nbytes([(c.k, c.v) for c in bf16.groups]) // 2 == 21 * (16384 + 4096) * 8 * 256 * 2
    assert nbytes(scales) == slots_x_heads * 2 * 4
    assert nbytes(small) == nbytes(bf16) - nbytes(kv) + nbytes(scales)
    assert 1.75e9 < nbytes(kv) + nbytes(scales) < 1.8e9

    real = {d: gj.KVCache.create(CONFIG, 2, 40, d) for d in ("bfloat16", dtype)}
    kv_real = sum(c.k.nbytes + c.v.nbytes for c in (*real[dtype].groups, *real[dtype].tail))
    scales_real = sum(c.k_scale.nbytes + c.v_scale.nbytes for c in (*real[dtype].groups, *real[dtype].tail))
    assert real[dtype].nbytes == real["bfloat16"].nbytes - kv_real + scales_real
    assert all(c.k_scale is None for c in (*real["bfloat16"].groups, *real["bfloat16"].tail))  # no scales at 16 bits


def test_unknown_cache_dtype_names_the_allowed_values(tiny_tokenizer, model):
    allowed = "use one of bfloat16, float32, float16, fp8, int8"
    for bad in ("int4", "float8_e5m2", jnp.int32):
        with pytest.raises(ValueError, match=rf"unknown cache dtype .*; {allowed}"):
            gj.KVCache.create(CONFIG, 1, 8, bad)
    with pytest.raises(ValueError, match=allowed):
        Sampler(model, tiny_tokenizer, cache_dtype="int4")
    assert Sampler(model, tiny_tokenizer, cache_dtype="fp8").cache_dtype == jnp.float8_e4m3fn


@pytest.mark.parametrize("dtype", EIGHT_BITS)
def test_write_quantizes_per_token_and_head(dtype):
    """Each (row, token, kv head) gets scale absmax / qmax over head_dim, however different their magnitudes."""
    b, t, k, h = 2, 5, 3, 16
    rng = np.random.default_rng(0)
    x = rng.normal(size=(b, t, k, h)) * 10.0 ** rng.uniform(-3, 3, (b, t, k, 1))
    stored = kv_cache.cache_dtype(dtype)
    layer = kv_cache.LayerCache(
        k=jnp.zeros((b, k, h, 8), stored),
        v=jnp.zeros((b, k, 8, h), stored),
        positions=jnp.full((b, 8), kv_cache.EMPTY, jnp.int32),
        k_scale=jnp.zeros((b, k, 1, 8)),
        v_scale=jnp.zeros((b, k, 1, 8)),
    )
    positions = jnp.asarray(np.tile(np.arange(t), (b, 1)), jnp.int32)
    written = kv_cache.write(layer, jnp.asarray(x, jnp.float32), jnp.asarray(-x, jnp.float32), positions, ring=False)
    top = 127.0 if dtype == "int8" else 448.0
    amax = np.abs(x).max(-1)  # [B, T, K]
    np.testing.assert_allclose(np.asarray(written.k_scale)[:, :, 0, :t], amax.transpose(0, 2, 1) / top, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(written.v_scale)[:, :, 0, :t], amax.transpose(0, 2, 1) / top, rtol=1e-6)
    keys = np.asarray(written.k, np.float32) * np.asarray(written.k_scale)  # [B, K, H, S]
    keys = keys[..., :t].transpose(0, 3, 1, 2)  # [B, T, K, H]
    step = amax[..., None] / top  # one int8 step; e4m3: 2^-4 of the magnitude (below 2^-6 * scale: subnormal steps)
    bound = step * 0.5 if dtype == "int8" else np.maximum(np.abs(x) * 2.0**-4, step * 2.0**-9)
    assert np.all(np.abs(keys - x) <= bound * (1 + 1e-5))
    assert (np.asarray(written.k_scale)[..., t:] == 0).all()  # untouched slots


@pytest.mark.parametrize("dtype", EIGHT_BITS)
def test_model_through_8bit_cache_tracks_the_full_forward(spread_model, dtype):
    """Prefill chunks and decode steps through an 8-bit cache (ring wrap included) vs one float32 forward."""
    tokens, mask = left_padded(np.random.default_rng(0), [40, 23, 9], CONFIG.vocab_size)
    model = spread_model
    full = np.asarray(model(jnp.asarray(tokens), mask=jnp.asarray(mask))[0])[mask]
    positions = np.cumsum(mask, axis=1) - 1
    cache = gj.KVCache.create(CONFIG, 3, 64, dtype)
    step = nnx.jit(lambda m, t, p, k, c: m(t, p, k, cache=c))
    out = []
    for cols in (slice(0, 20), *(slice(i, i + 1) for i in range(20, 40))):
        logits, cache = step(model, *(jnp.asarray(a[:, cols]) for a in (tokens, positions, mask)), cache)
        out.append(np.asarray(logits))
    got = np.concatenate(out, axis=1)[mask]
    assert cache.groups[0].k.dtype == kv_cache.cache_dtype(dtype)
    # Measured: top-1 agreement 1.00 for both, max |diff| 0.064 (int8) and 0.42 (fp8) with logits up to 24.3.
    assert np.mean(got.argmax(-1) == full.argmax(-1)) >= 0.97
    np.testing.assert_allclose(got, full, atol=1.0 if dtype == "fp8" else 0.2, rtol=0)


@pytest.mark.parametrize("dtype", EIGHT_BITS)
def test_sampler_greedy_decode(model, tiny_tokenizer, dtype):
    """`Sampler(cache_dtype=...)` prefills and decodes through the 8-bit cache; greedy tokens follow float32's."""
    prompts = [[2, *range(120, 150)], [2, 300, 301, 302]]
    want = Sampler(model, tiny_tokenizer, cache_length=64).generate(prompts, max_new_tokens=16)
    sampler = Sampler(model, tiny_tokenizer, cache_length=64, cache_dtype=dtype)
    assert sampler.new_cache(1).groups[0].k_scale is not None
    got = sampler.generate(prompts, max_new_tokens=16)
    # Measured: int8 gives float32's 16 tokens in both rows; fp8 those of row 0, and row 1's first 3, after which a
    # near-tie flips and the greedy text goes its own way (still 16 tokens, no stop).
    assert [len(g.token_ids) for g in got] == [len(w.token_ids) for w in want] == [16, 16]
    agree = 16 if dtype == "int8" else 3
    assert all(g.token_ids[:agree] == w.token_ids[:agree] for g, w in zip(got, want, strict=True)), (got, want)


@pytest.mark.parametrize("length", [None, 32])  # a full-length row cache; a prompt-sized scratch cache
def test_insert_copies_the_scales(model, tiny_tokenizer, length):
    """`sampler.insert` puts a prefilled one-row 8-bit cache (values, scales, positions) into a running batch's row:
    the slots it has; the positions past a scratch cache read EMPTY."""
    sampler = Sampler(model, tiny_tokenizer, cache_length=64, cache_dtype="int8")
    prompt = [[2, *range(200, 220)]]
    logits, row_cache = sampler.prefill(sampler.new_cache(1, length), prompt)
    row_state = sampler.start(logits, prompt, 4, sampler_lib.SamplingParams.create(1), seed=0)
    batch = sampler.new_cache(3)
    before = jax.tree.map(np.asarray, batch)
    empty = sampler_lib.DecodeState.empty(3, CONFIG.vocab_size)
    cache, _ = sampler_lib.insert(batch, empty, row_cache, row_state, 1)
    for name in ("k", "v", "positions", "k_scale", "v_scale"):
        for got, row, old in zip(cache.groups, row_cache.groups, before.groups, strict=True):
            new = _slots_last(getattr(got, name)[:, 1], name)  # [G, B, ...]
            np.testing.assert_array_equal(new[..., : row.size], _slots_last(getattr(row, name)[:, 0], name))
            np.testing.assert_array_equal(getattr(got, name)[:, 0], getattr(old, name)[:, 0])
        for got, row in zip(cache.tail, row_cache.tail, strict=True):
            np.testing.assert_array_equal(
                _slots_last(getattr(got, name)[1], name)[..., : row.size], _slots_last(getattr(row, name)[0], name)
            )
    assert np.asarray(cache.groups[1].k_scale)[:, 1].any()  # the scales were written, not left at zero
    positions = np.asarray(cache.groups[1].positions[:, 1])
    assert (positions[:, row_cache.groups[1].size :] == kv_cache.EMPTY).all()


def _slots_last(x: jax.Array, name: str) -> np.ndarray:
    """A cache array with its slot axis last (v keeps it second to last)."""
    return np.moveaxis(np.asarray(x), -2, -1) if name == "v" else np.asarray(x)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model, tiny_tokenizer):
    root = tmp_path_factory.mktemp("kv8")
    shutil.copy(tiny_tokenizer.model_file, root / "tokenizer.model")
    return checkpoint.save(root / "ckpt", CONFIG, gj.params_of(model), dtype="float32", tokenizer_dir=root)


def test_sample_cli_cache_dtype(ckpt, monkeypatch, capsys):
    """`--cache-dtype int8` reaches the Sampler (its cache is 8-bit) and generates; an unknown value is refused."""
    monkeypatch.setattr(sample.sharding, "maybe_initialize_distributed", lambda *a: False)
    made = []
    monkeypatch.setattr(sample, "Sampler", lambda *a, **kw: made.append(Sampler(*a, **kw)) or made[-1])
    argv = ["--checkpoint", str(ckpt), "--cache-length", "32", "--max-new-tokens", "4", "--json", "--prompt", "Hi"]
    assert sample.main([*argv, "--cache-dtype", "int8"]) == 0
    assert made[0].cache_dtype == jnp.int8 and '"token_ids"' in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        sample.main([*argv, "--cache-dtype", "int4"])
    assert e.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err


def test_serve_cli_cache_dtype(ckpt, monkeypatch):
    """`python -m gemma_jax.serve --cache-dtype fp8` builds the engine's Sampler with an fp8 cache."""
    from gemma_jax.serve import __main__ as serve_main

    served = []
    monkeypatch.setattr(serve_main.sharding, "maybe_initialize_distributed", lambda *a: False)
    monkeypatch.setattr(serve_main.Engine, "warmup", lambda self: None)
    monkeypatch.setattr(serve_main, "create_app", lambda engine, **options: served.append(engine))
    monkeypatch.setattr(serve_main.server, "make_server", lambda app, engine, **kw: None)
    monkeypatch.setattr(serve_main.server, "run", lambda server: 0)
    assert serve_main.main(["--checkpoint", str(ckpt), "--cache-dtype", "fp8", "--slots", "2"]) == 0
    (engine,) = served
    assert engine.sampler.cache_dtype == jnp.float8_e4m3fn
    assert jax.eval_shape(lambda: engine.sampler.new_cache(2)).groups[0].k_scale is not None


def test_fp8_benchmark_cache_rows_run_on_cpu():
    """benchmarks/fp8.py's accelerator command times decode over a bf16, fp8 and int8 cache filled to --cache-fill;
    on the CPU at a tiny shape its rows build, compile and run, and its filled cache holds what a prefill would."""
    script = runpy.run_path(str(REPO / "benchmarks" / "fp8.py"))
    config = gj.gemma2_tiny(sliding_window=16)
    cache = script["filled_cache"](config, 2, 42, "int8", 40)
    ring, full = cache.groups  # sliding (16 slots) and global (42 slots)
    assert sorted(np.asarray(ring.positions[0, 1]).tolist()) == list(range(24, 40))  # the last 16 of 40
    assert np.asarray(full.positions[0, 1]).tolist() == [*range(40), kv_cache.EMPTY, kv_cache.EMPTY]
    model = gj.Transformer(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    args = argparse.Namespace(batch=[2], cache_fill=40, steps=2, repeats=1)
    rows = list(script["bench_cache"](model, config, args, None))
    assert [r["cache"] for r in rows] == ["bfloat16", "fp8", "int8"] and all(r["decode"] > 0 for r in rows)
    assert rows[1]["step_gb"] < rows[0]["step_gb"]  # half the cache bytes read per step


def test_server_engine_inserts_8bit_rows(model, tiny_tokenizer):
    """The server's engine with an int8 cache: more prompts than slots, so rows are prefilled alone and inserted
    (scales and all) into the running batch and reused; each gets the text the Sampler gives it alone."""
    import asyncio

    from gemma_jax.serve import GenerationParams
    from gemma_jax.serve.engine import Engine

    sampler = Sampler(model, tiny_tokenizer, cache_length=64, cache_dtype="int8")
    prompts = [[2, *range(120, 150)], [2, 300, 301, 302], [2, *range(400, 410)]]
    want = [sampler.generate([p], max_new_tokens=8)[0].text for p in prompts]
    engine = Engine(sampler, slots=2)

    async def serve() -> list[str]:
        engine.start()
        params = [GenerationParams(max_tokens=8, temperature=0)] * len(prompts)
        try:
            pieces = [(i, out.text) async for i, out in engine.submit(prompts, params)]
        finally:
            await engine.close()
        return ["".join(text for j, text in pieces if j == i) for i in range(len(prompts))]

    assert asyncio.run(serve()) == want
