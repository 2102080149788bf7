"""The engine's scheduling: batched admission into prompt-sized scratch caches, nothing compiled after warmup,
pipelined decode calls, and tensor-parallel serving meshes. A random tiny model (no HF oracle needed): the
reference is `Sampler.generate` of one prompt alone, over the same weights."""

from __future__ import annotations

import asyncio
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gemma_jax as gj
from gemma_jax import sampler as sampler_lib
from gemma_jax import sharding
from gemma_jax.kv_cache import EMPTY
from gemma_jax.sampler import DecodeState, Sampler
from gemma_jax.sampling import SamplingParams

pytest.importorskip("prometheus_client")
from gemma_jax.serve import Engine, GenerationParams
from gemma_jax.serve.engine import batch_buckets
from gemma_jax.serve.metrics import compiles

CONTEXT = 128
MAX_PROMPT = 70  # prompt buckets 32, 64, 128


def tiny(window: int) -> gj.Transformer:
    return gj.Transformer(gj.gemma2_tiny(sliding_window=window), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def sampler(tiny_tokenizer) -> Sampler:
    """Window 16: every scratch cache (32 slots at least) is longer than the sliding layers' ring."""
    return Sampler(tiny(16), tiny_tokenizer, cache_length=CONTEXT, prefill_chunk=64)


@pytest.fixture
def engine(sampler) -> Engine:
    """A fresh engine (its event loop is the test's); the compiled programs are the module's, shared."""
    engine = Engine(sampler, slots=4, decode_steps=3, max_prompt_tokens=MAX_PROMPT, admission_tokens=128)
    engine.warmup()
    return engine


def prompt(length: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 400, length).tolist()


def alone(sampler: Sampler, ids: list[int], max_tokens: int) -> str:
    return sampler.generate([ids], max_new_tokens=max_tokens)[0].text


def serve(engine: Engine, *waves: list, max_tokens: int | list[int] = 10, **params) -> list[str]:
    """Run the engine over waves of prompts (each wave submitted at once, after the one before finished):
    the texts of the last wave. A wave's item is a prompt, or (prompt, settings of its own)."""

    async def run() -> list[str]:
        engine.start()
        for wave in waves:
            budgets = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(wave)
            items = [item if isinstance(item, tuple) else (item, {}) for item in wave]
            requests = [
                GenerationParams(**{"max_tokens": b, "temperature": 0, **params, **own})
                for b, (_, own) in zip(budgets, items, strict=True)
            ]
            handle = engine.submit([ids for ids, _ in items], requests)
            texts = [""] * len(wave)
            async for i, out in handle:
                texts[i] += out.text
        await engine.close()
        return texts

    return asyncio.run(run())


# -- batched admission ---------------------------------------------------------------------------------------


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(4) == [1, 2, 4]
    assert batch_buckets(6) == [1, 2, 4, 6]


@pytest.mark.parametrize("window", [16, 48])  # scratch caches longer than the ring; a 32-slot one shorter
def test_insert_writes_the_scratch_slots_and_empties_the_rest_of_the_row(tiny_tokenizer, window):
    """A short request inserted over a row that held a long one: k/v past the scratch cache keep their old
    values (not written), positions past it read EMPTY (nothing of the old request is visible), and the new
    request decodes exactly as alone."""
    s = Sampler(tiny(window), tiny_tokenizer, cache_length=CONTEXT, prefill_chunk=64)
    long, short = prompt(90, 1), prompt(20, 2)

    cache, dstate = s.new_cache(2), DecodeState.empty(2, s.config.vocab_size)
    logits, full = s.prefill(s.new_cache(1), [long])
    cache, dstate = sampler_lib.insert(
        cache, dstate, full, s.start(logits, [long], 8, SamplingParams.create(1), [5]), 1
    )
    old = jax.tree.map(np.asarray, cache)

    logits, scratch = s.prefill(s.new_cache(2, 32), [short, [2]])  # the second row is batch padding
    assert scratch.groups[0].size == min(32, window) and scratch.groups[1].size == 32
    state = s.start(logits, [short, [2]], 8, SamplingParams.create(2), [0, 0])
    cache, dstate = sampler_lib.insert(cache, dstate, scratch, state, np.array([1, 2], np.int32))  # 2: dropped
    for new, before, small in zip(cache.groups, old.groups, scratch.groups, strict=True):
        n = small.size
        positions = np.asarray(new.positions[:, 1])
        np.testing.assert_array_equal(positions[:, :n], np.asarray(small.positions[:, 0]))
        assert (positions[:, n:] == EMPTY).all()
        np.testing.assert_array_equal(np.asarray(new.k[:, 1, ..., n:]), before.k[:, 1, ..., n:])
        np.testing.assert_array_equal(np.asarray(new.k[:, 0]), before.k[:, 0])  # the other row untouched
    tokens = [int(dstate.tokens[1])]
    while not bool(dstate.done[1]):
        cache, dstate, out, _ = s.decode(cache, dstate, 4)
        tokens += [t for t in np.asarray(out)[1].tolist() if t != sampler_lib.NO_TOKEN]
    if tokens[-1] in s.tokenizer.stop_ids:
        tokens.pop()
    assert tokens == s.generate([short], max_new_tokens=8)[0].token_ids


def test_waiting_requests_are_prefilled_together_by_prompt_bucket(engine, sampler, monkeypatch):
    """Six requests at once into four slots: the first four are admitted in one round, one prefill call per prompt
    bucket (batch padded to 1, 2 or 4), the rest when rows free; every text equals the prompt run alone."""
    prompts = [prompt(n, i) for i, n in enumerate([5, 40, 12, 50, 3, 66])]
    budgets = [6, 9, 4, 12, 7, 5]
    expected = [alone(sampler, p, b) for p, b in zip(prompts, budgets, strict=True)]
    calls = []
    original = sampler.prefill

    def spy(cache, ids):
        calls.append((len(ids), cache.groups[1].size, sorted(map(len, ids))))
        return original(cache, ids)

    monkeypatch.setattr(sampler, "prefill", spy)
    assert serve(engine, prompts, max_tokens=budgets) == expected
    assert calls[:2] == [(2, 32, [5, 12]), (2, 64, [40, 50])]  # two buckets, each a batch of two
    assert sorted(n for _, _, lengths in calls for n in lengths if n > 1) == sorted(map(len, prompts))  # 1: padding


def test_a_batch_over_the_admission_budget_is_split(engine, sampler, monkeypatch):
    """admission_tokens=128: two 64-bucket prompts per call at most, so four such prompts take two calls."""
    assert engine.max_batch(32) == 4 and engine.max_batch(64) == 2 and engine.max_batch(128) == 1
    prompts = [prompt(50 + i, 10 + i) for i in range(4)]
    expected = [alone(sampler, p, 5) for p in prompts]
    sizes = []
    original = sampler.prefill

    def spy(cache, ids):
        sizes.append(len(ids))
        return original(cache, ids)

    monkeypatch.setattr(sampler, "prefill", spy)
    assert serve(engine, prompts, max_tokens=5) == expected
    assert sizes[:2] == [2, 2]


# -- nothing compiles after warmup -----------------------------------------------------------------------------


@pytest.mark.parametrize("mesh", [None, "tensor=2"])
def test_nothing_compiles_after_warmup(tiny_tokenizer, mesh):
    """After warmup, requests of every prompt length (every bucket, one of two chunks too), alone and in every
    admission batch size, and evaluation requests (echo with logprobs in every bucket, max_tokens 0, penalties,
    logprobs) mixed with plain ones build no new executable, on one device (weights committed) or a mesh; the
    count is on /metrics as gemma_jax_compiles_total. A model of its own (window 20): no other test compiled its
    programs."""
    from prometheus_client import generate_latest

    model, mesh = tiny(20), mesh and sharding.make_mesh(mesh, jax.devices()[:2])
    if mesh is None:  # the weights committed to one device, as checkpoint.load_model leaves them
        graphdef, state = nnx.split(model)
        model = nnx.merge(graphdef, jax.device_put(state, jax.devices()[0]))
    else:
        model = sharding.shard_model(model, mesh)
    s = Sampler(model, tiny_tokenizer, cache_length=CONTEXT, prefill_chunk=64, mesh=mesh)
    engine = Engine(s, slots=4, decode_steps=3, max_prompt_tokens=MAX_PROMPT, admission_tokens=128)
    engine.warmup()
    before = compiles()
    lengths = list(range(1, MAX_PROMPT + 1))
    waves = [[prompt(n, n) for n in lengths[group::7][:group]] for group in (1, 2, 3, 4, 6)]
    waves.append(
        [
            (prompt(9, 1), dict(logprobs=2, prompt_logprobs=2)),  # echo with logprobs: a scored prefill, alone
            (prompt(40, 2), dict(logprobs=0, prompt_logprobs=0)),
            (prompt(70, 3), dict(max_tokens=0, prompt_logprobs=5)),  # the prompt scored only: no row started
            (prompt(5, 4), dict(presence_penalty=1.0, frequency_penalty=0.5, repetition_penalty=1.3, logprobs=3)),
            (prompt(30, 5), dict(repetition_penalty=0.8, temperature=0.7, seed=3)),
            prompt(12, 6),
        ]
    )
    serve(engine, *waves, [prompt(n, n) for n in lengths], max_tokens=3)  # the last: queued beyond the slots
    assert compiles() == before
    text = generate_latest(engine.metrics.registry).decode()
    assert re.search(rf"^gemma_jax_compiles_total {float(before)}$", text, re.M), text
    jax.jit(lambda x: x + 1)(1.0)  # a new function: the counter sees its compile
    assert compiles() > before


def test_max_prompt_tokens_is_checked(engine):
    with pytest.raises(ValueError, match=r"at most 70 .*--max-prompt-tokens"):
        engine.check([5] * 71, GenerationParams(max_tokens=1))
    with pytest.raises(ValueError, match="below the context length"):
        Engine(engine.sampler, max_prompt_tokens=CONTEXT)


def test_init_cache_compiles_once():
    mesh = sharding.make_mesh("data=2", jax.devices()[:2])
    config = gj.gemma2_tiny()
    sharding.init_cache(config, 2, 48, jnp.float32, mesh)
    before = compiles()
    cache = sharding.init_cache(config, 2, 48, jnp.float32, mesh)
    assert compiles() == before
    assert len(cache.groups[0].k.sharding.device_set) == 2


# -- pipelined dispatch ----------------------------------------------------------------------------------------


class _Logged:
    """A decode call's tokens that log when the host reads them."""

    def __init__(self, tokens, log: list, index: int):
        self.tokens, self.log, self.index = tokens, log, index

    def __array__(self, dtype=None, copy=None):
        self.log.append(("read", self.index))
        return np.asarray(self.tokens, dtype)


def test_the_next_decode_call_is_dispatched_before_the_last_is_read(engine, sampler, monkeypatch):
    """The host reads call i's tokens only after dispatching call i+1, so the device always has work queued."""
    ids = prompt(8, 3)
    expected = alone(sampler, ids, 20)
    log = []
    original = sampler.decode

    def logged(cache, dstate, steps):
        index = sum(event == "dispatch" for event, _ in log)
        log.append(("dispatch", index))
        cache, dstate, tokens, scores = original(cache, dstate, steps)
        return cache, dstate, _Logged(tokens, log, index), scores

    monkeypatch.setattr(sampler, "decode", logged)
    assert serve(engine, [ids], max_tokens=20) == [expected]
    dispatched = {i: n for n, (event, i) in enumerate(log) if event == "dispatch"}
    reads = [(n, i) for n, (event, i) in enumerate(log) if event == "read"]
    assert len(reads) >= 4
    for n, i in reads:
        if i + 1 in dispatched:
            assert dispatched[i + 1] < n, log


def test_a_stop_string_ends_the_text_though_the_row_decodes_one_call_more(engine, sampler):
    """A stop string matched on the host while the next call already runs: the text still stops there."""
    ids = prompt(10, 4)
    full = alone(sampler, ids, 24)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), full
    (text,) = serve(engine, [ids], max_tokens=24, stop=(stop,))
    assert text == full[: full.index(stop)]


# -- serving meshes --------------------------------------------------------------------------------------------


def weight_all_gathers(model: gj.Transformer, spec: str) -> list[str]:
    """All-gathers in the compiled decode step on a 2-device mesh whose result has a parameter's shape (one layer's,
    or the stacked one): a weight gathered on every step."""
    mesh = sharding.make_mesh(spec, jax.devices()[:2])
    s = Sampler(sharding.shard_model(model, mesh), _NoText(), cache_length=64, mesh=mesh)
    with jax.set_mesh(mesh):
        state = DecodeState.empty(4, s.config.vocab_size)
        lowered = sampler_lib._decode.lower(s._graphdef, s._state, s.new_cache(4), state, s._stop_ids, 2)
        hlo = lowered.compile().as_text()
    shapes = set()
    for p in jax.tree.leaves(gj.params_of(model)):
        shapes |= {tuple(p.shape), tuple(p.shape[1:])}
    gathered = re.findall(r"= \w+\[([\d,]*)\][^ ]* all-gather\(", hlo)
    return [g for g in gathered if tuple(int(d) for d in g.split(",") if d) in shapes]


class _NoText:
    vocab_size, stop_ids, pad_id, bos_id = 480, (1,), 0, 2


def test_tensor_parallel_decode_gathers_no_weights():
    """The serving preset (tensor) splits weights by heads and MLP width: no weight is all-gathered per decode
    step. FSDP (the training layout) gathers them on every step."""
    model = tiny(16)
    assert weight_all_gathers(model, sharding.SERVE_MESH) == []
    assert len(weight_all_gathers(model, "fsdp=2")) > 5


def test_serve_mesh_flag_defaults_to_tensor_parallelism():
    from gemma_jax.serve.__main__ import build_parser

    parser = build_parser()
    assert parser.parse_args(["--mesh"]).mesh == "tensor"
    assert parser.parse_args(["--mesh", "data=2,tensor=4"]).mesh == "data=2,tensor=4"
    assert parser.parse_args([]).mesh is None
    assert "all-gather" in parser.format_help()
