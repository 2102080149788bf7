"""Sampler: greedy output token-identical to HF `generate`, chunked/bucketed prefill, streaming, row insertion."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_model, hf_state_dict
from flax import nnx

import gemma_jax as gj
from gemma_jax import sampler as sampler_lib
from gemma_jax.sampler import DecodeState, Sampler
from gemma_jax.sampling import SamplingParams
from gemma_jax.tokenizer import Tokenizer

CONFIG = gj.gemma2_tiny(sliding_window=16)


def make(model, tokenizer, **kw):
    """Samplers share one cache length, chunk and step count, so the tests share compiled programs."""
    return Sampler(
        model, tokenizer, **({"cache_length": 96, "prefill_chunk": 32, "decode_steps": 8, "stream_steps": 8} | kw)
    )


@pytest.fixture(scope="module")
def models():
    """HF and our model with the same weights; a small embedding so greedy text varies instead of
    repeating the last token (a large tied embedding makes every residual stream point at its input)."""
    import torch

    hf = hf_model(CONFIG, seed=0)
    with torch.no_grad():
        hf.model.embed_tokens.weight.normal_(0.0, 0.05)
    ours = gj.from_params(CONFIG, gj.from_hf_state_dict(hf_state_dict(hf), CONFIG))
    return hf, ours


def prompts(lengths, seed=0):
    """Random prompts that avoid the special ids (pad, eos, bos, turn markers)."""
    rng = np.random.default_rng(seed)
    return [[2, *rng.integers(110, CONFIG.vocab_size, n - 1).tolist()] for n in lengths]


def hf_generate(hf, batch, max_new_tokens, stop_ids):
    """HF greedy generation on a left-padded batch; each row cut after its first stop id (kept)."""
    import torch

    tokens, mask = sampler_lib.left_pad(batch, max(map(len, batch)), 0)
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.as_tensor(tokens, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=list(stop_ids),
            pad_token_id=0,
        )
    rows = []
    for row in out[:, tokens.shape[1] :].tolist():
        stops = [i for i, t in enumerate(row) if t in stop_ids]
        rows.append(row[: stops[0] + 1] if stops else row)
    return rows


def ours_with_stop(completions, stop_ids):
    """Our completions in HF's form: token ids with the stop token put back."""
    return [c.token_ids + ([stop_ids[0]] if c.finish_reason == "stop" else []) for c in completions]


def test_batch_of_three_matches_hf(models, tiny_tokenizer):
    hf, model = models
    batch = prompts([5, 23, 2])
    out = make(model, tiny_tokenizer).generate(batch, max_new_tokens=12)
    assert ours_with_stop(out, tiny_tokenizer.stop_ids) == hf_generate(hf, batch, 12, tiny_tokenizer.stop_ids)
    assert all(c.finish_reason == "length" and len(c.token_ids) == 12 for c in out)


def test_ring_wraps_past_three_windows(models, tiny_tokenizer):
    """Window 16: 60 new tokens after a 20-token prompt wrap the sliding layers' ring 4 times."""
    hf, model = models
    batch = prompts([20, 7, 12], seed=1)
    sampler = make(model, tiny_tokenizer)
    out = sampler.generate(batch, max_new_tokens=60)
    assert ours_with_stop(out, tiny_tokenizer.stop_ids) == hf_generate(hf, batch, 60, tiny_tokenizer.stop_ids)
    assert [len(c.token_ids) for c in out] == [60, 60, 60]


def test_stop_mid_batch_matches_hf(models, tiny_tokenizer):
    hf, model = models
    batch = prompts([6, 14, 9], seed=2)
    free = make(model, tiny_tokenizer).generate(batch, max_new_tokens=16)
    row0 = free[0].token_ids
    stop = next(t for i, t in enumerate(row0) if i >= 3 and t not in row0[:i])  # first new token of row 0 at >= 3
    assert any(stop not in c.token_ids for c in free[1:]), "pick seeds where some row does not stop"
    tokenizer = Tokenizer(tiny_tokenizer.model_file, stop_ids=[stop])
    out = make(model, tokenizer).generate(batch, max_new_tokens=16)
    assert ours_with_stop(out, [stop]) == hf_generate(hf, batch, 16, [stop])
    assert out[0].finish_reason == "stop" and out[0].token_ids == row0[: row0.index(stop)]
    assert "length" in {c.finish_reason for c in out}


def test_chunked_prefill_and_buckets(models, tiny_tokenizer, caplog):
    """A 70-token prompt in chunks of 32 (left-padded to 96) matches HF; prompts of 5 and 9 tokens share bucket 32."""
    hf, model = models
    long = prompts([70], seed=3)
    sampler = make(model, tiny_tokenizer)
    with caplog.at_level(logging.INFO, logger="gemma_jax.sampler"):
        out = sampler.generate(long, max_new_tokens=8)
    assert "bucket 96 (3 chunk(s) of 32)" in caplog.text
    assert ours_with_stop(out, tiny_tokenizer.stop_ids) == hf_generate(hf, long, 8, tiny_tokenizer.stop_ids)
    sampler = make(model, tiny_tokenizer)
    sampler.generate(prompts([5]), max_new_tokens=2)
    compiled = sampler_lib._prefill_chunk._cache_size()
    sampler.generate(prompts([9]), max_new_tokens=2)
    assert sampler_lib._prefill_chunk._cache_size() == compiled


def test_generate_allocates_the_request_not_the_context(models, tiny_tokenizer, monkeypatch):
    """With a long context, `generate` creates a cache for its request (prompt + max_new_tokens, 256 slots times a
    power of four, up to the context) and gives the same tokens as a sampler whose whole context is that short."""
    assert sampler_lib.request_cache_length(5, 64, 2048, 16384) == 256
    assert sampler_lib.request_cache_length(200, 100, 2048, 16384) == 1024
    assert sampler_lib.request_cache_length(1000, 24, 2048, 16384) == 1024
    assert sampler_lib.request_cache_length(1000, 100, 2048, 16384) == 4096
    assert sampler_lib.request_cache_length(3000, 10, 4096, 16384) == 4096
    assert sampler_lib.request_cache_length(4097, 10, 2048, 16384) == 16384  # its padded prompt (6144) fits
    assert sampler_lib.request_cache_length(16000, 300, 2048, 16384) == 16384
    assert sampler_lib.request_cache_length(5, 10, 2048, 96) == 96
    _, ours = models
    long = make(ours, tiny_tokenizer, cache_length=8192)
    sizes = []
    new_cache = long.new_cache
    monkeypatch.setattr(long, "new_cache", lambda batch, length=None: sizes.append(length) or new_cache(batch, length))
    batch = prompts([7, 30])
    assert long.generate(batch, max_new_tokens=20) == make(ours, tiny_tokenizer).generate(batch, max_new_tokens=20)
    assert sizes == [256]
    assert max(g.size for g in long.new_cache(1).groups) == 8192  # a server's batch takes the whole context


def test_stream_equals_generate(models, tiny_tokenizer):
    _, model = models
    sampler = make(model, tiny_tokenizer)
    # seed 8 samples no stop token in 20 steps (checked below), so the stream spans several decode calls
    pieces = list(sampler.stream("Hello world", max_new_tokens=20, temperature=0.8, seed=8))
    full = sampler.generate(["Hello world"], max_new_tokens=20, temperature=0.8, seed=8)[0]
    assert full.finish_reason == "length" and len(pieces) > 1
    assert "".join(pieces) == full.text


def test_seeds_and_top_k_one(models, tiny_tokenizer):
    _, model = models
    sampler = make(model, tiny_tokenizer)
    batch = prompts([4, 8, 6], seed=4)

    def run(**kw):
        return [c.token_ids for c in sampler.generate(batch, max_new_tokens=10, **kw)]

    greedy = run()
    assert run(temperature=1.0, top_k=1, seed=1) == greedy
    assert run(temperature=1.5, seed=7) == run(temperature=1.5, seed=7)
    assert run(temperature=1.5, seed=7) != run(temperature=1.5, seed=8)


def test_insert_into_running_batch(models, tiny_tokenizer):
    """A request joining a running batch in a free row gets the same tokens as when run alone."""
    _, model = models
    sampler = make(model, tiny_tokenizer)
    a, b = prompts([9, 5], seed=5)
    alone = [sampler.generate([p], max_new_tokens=12)[0].token_ids for p in (a, b)]
    greedy = SamplingParams.create(1)

    def request(p):
        logits, row_cache = sampler.prefill(sampler.new_cache(1), [p])
        return row_cache, sampler.start(logits, [p], 12, greedy, seed=0)

    cache, dstate = sampler.new_cache(3), DecodeState.empty(3, model.config.vocab_size)  # row 2 stays free throughout
    cache, dstate = sampler_lib.insert(cache, dstate, *request(a), 0)
    rows = [[int(dstate.tokens[0])], [], []]
    cache, dstate, out, _ = sampler.decode(cache, dstate, 8)
    assert (out[1:] == sampler_lib.NO_TOKEN).all()  # free rows do not run
    rows[0] += out[0].tolist()
    cache, dstate = sampler_lib.insert(cache, dstate, *request(b), 1)
    rows[1].append(int(dstate.tokens[1]))
    while not bool(jnp.all(dstate.done)):
        cache, dstate, out, _ = sampler.decode(cache, dstate, 8)
        for row, new in zip(rows, out.tolist(), strict=True):
            row += [t for t in new if t != sampler_lib.NO_TOKEN]
    assert rows == [*alone, []]


@pytest.mark.parametrize(
    "prompt, kwargs, match",
    [
        ([2] * 90, {"max_new_tokens": 10}, "90 tokens.*100 cache slots.*cache_length is 96"),
        ([2] * 97, {"max_new_tokens": 1}, "97 tokens.*cache_length is 96"),
        ("", {}, "prompt 0 is empty"),
        ([], {}, "prompt 0 is empty"),
        ([2, 9999], {}, "outside"),
        ("hi", {"temperature": -0.5}, "temperature must be >= 0"),
        ("hi", {"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ("hi", {"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ("hi", {"top_k": -1}, "top_k must be >= 0"),
        ("hi", {"min_p": 2.0}, "min_p"),
        ("hi", {"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_bad_input_fails_before_compile(models, tiny_tokenizer, monkeypatch, prompt, kwargs, match):
    _, model = models

    def compile_attempt(*args):
        raise AssertionError("reached the jitted prefill")

    monkeypatch.setattr(sampler_lib, "_prefill_chunk", compile_attempt)
    with pytest.raises(ValueError, match=match):
        make(model, tiny_tokenizer).generate([prompt], **kwargs)


def test_bad_settings(models, tiny_tokenizer):
    _, model = models
    with pytest.raises(ValueError, match="unknown cache dtype"):
        Sampler(model, tiny_tokenizer, cache_dtype="float17")
    with pytest.raises(ValueError, match="cache_length"):
        Sampler(model, tiny_tokenizer, cache_length=0)
    with pytest.raises(ValueError, match="non-empty list"):
        Sampler(model, tiny_tokenizer).generate("a string, not a list")


def test_sharded_sampler_matches_single_device(models, tiny_tokenizer):
    """Over a data x fsdp x tensor mesh of 8 CPU devices: cache in its shardings, same greedy tokens."""
    from gemma_jax import sharding

    _, model = models
    batch = prompts([7, 3, 5], seed=6)
    expected = make(model, tiny_tokenizer).generate(batch, max_new_tokens=6)
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    sharded = make(sharding.shard_model(gj.from_params(CONFIG, gj.params_of(model)), mesh), tiny_tokenizer, mesh=mesh)
    assert len(sharded.new_cache(3).groups[0].k.sharding.device_set) == 8
    assert sharded.generate(batch, max_new_tokens=6) == expected


def test_9b_cache_at_16k_is_3_5_gb(tiny_tokenizer):
    """The Sampler's default cache for one 9B sequence in bf16 (an accelerator's default; CPUs get float32, see
    test_cache_dtype_defaults): sliding layers hold a 4096 ring, global layers 16k."""
    model = gj.abstract_model(gj.gemma2_9b(), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    sampler = Sampler(model, tiny_tokenizer, cache_dtype=sampler_lib.default_cache_dtype(jnp.bfloat16, "gpu"))
    cache = jax.eval_shape(lambda: sampler.new_cache(1))
    kv_bytes = sum(x.size * x.dtype.itemsize for c in cache.groups for x in (c.k, c.v))
    assert sampler.cache_length == 16384 and 3.4e9 < kv_bytes < 3.6e9  # a full-length cache would be 5.6 GB


def test_cache_dtype_defaults():
    """The compute dtype, but float32 on CPU for sub-32-bit floats (XLA:CPU converts a bf16 cache whole per step)."""
    assert sampler_lib.default_cache_dtype(jnp.bfloat16, "gpu") == jnp.bfloat16
    assert sampler_lib.default_cache_dtype(jnp.bfloat16, "tpu") == jnp.bfloat16
    assert sampler_lib.default_cache_dtype(jnp.bfloat16, "cpu") == jnp.float32
    assert sampler_lib.default_cache_dtype(jnp.float32, "cpu") == jnp.float32


def test_split_groups_is_the_same_model():
    """Groups held apart (a loop) compute what the scanned stack computes: a prefill into a cache, then a decode
    step, with a tail layer after the groups (5 layers = 2 groups + 1)."""
    config = gj.gemma2_tiny(num_layers=5, sliding_window=4)
    model = gj.Transformer(config, rngs=nnx.Rngs(0))
    split = gj.transformer.split_groups(model)
    assert isinstance(split.groups, nnx.List) and len(split.groups) == config.num_groups
    assert not isinstance(model.groups, nnx.List)  # the model itself is left as it was
    tokens = jnp.asarray(prompts([9, 9], seed=1))

    @functools.partial(jax.jit, static_argnums=0)
    def prefill_and_step(graphdef, state):
        m = nnx.merge(graphdef, state)
        logits, cache = m(tokens, cache=gj.KVCache.create(config, 2, 16, jnp.float32))
        step, cache = m(tokens[:, -1:], jnp.full((2, 1), 9), cache=cache)
        return logits, step, cache

    outs = [prefill_and_step(*nnx.split(m)) for m in (model, split)]
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def weight_slices(sampler: Sampler, kernel_shape: tuple[int, ...]) -> int:
    """Instructions in the compiled decode loop that slice a layer's MLP kernel out of something."""
    cache, state = sampler.new_cache(1), DecodeState.empty(1, CONFIG.vocab_size)
    lowered = sampler_lib._decode.lower(
        sampler._decode_graphdef, sampler._decode_state, cache, state, sampler._stop_ids, 4
    )
    shape = "f32[" + ",".join(map(str, kernel_shape)) + "]"
    return sum(1 for line in lowered.compile().as_text().splitlines() if f"= {shape}" in line and "slice" in line)


def test_cpu_decode_reads_layer_weights_in_place(models, tiny_tokenizer):
    """On CPU the Sampler holds the layer groups apart, so no decode step copies a layer's weights out of the
    stack; a Sampler over the stacked groups (as on a mesh) does, which shows the count can see them."""
    if jax.default_backend() != "cpu":
        pytest.skip(
            f"the Sampler holds the layer groups apart on XLA:CPU only; this backend is {jax.default_backend()}"
        )
    _, ours = models
    kernel = ours.groups.layers[0].mlp.gate.kernel.shape[1:]  # one layer's [D, F]
    assert weight_slices(make(ours, tiny_tokenizer), kernel) == 0
    stacked = make(ours, tiny_tokenizer)
    stacked._decode_graphdef, stacked._decode_state = nnx.split(ours)
    assert weight_slices(stacked, kernel) > 0
