"""Sharding on 8 fake CPU devices: every mesh gives the single-device logits and greedy tokens, each parameter
really is split as the rules say, and bad meshes are named before anything compiles."""

from __future__ import annotations

import argparse
import math
import pathlib
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import left_padded
from flax import nnx
from jax.sharding import PartitionSpec as P

import gemma_jax as gj
from gemma_jax import checkpoint, kv_cache
from gemma_jax import sharding as shd
from gemma_jax.sampler import Sampler

REPO = pathlib.Path(__file__).resolve().parents[1]
# tensor=8 divides heads, kv heads, mlp (128) and vocab (512); fsdp=8 divides embed (64); 5 layers = scanned
# groups plus an unscanned tail layer.
CONFIG = gj.gemma2_tiny(num_heads=8, num_kv_heads=8, num_layers=5)
MESHES = ["data=8", "fsdp=8", "tensor=8", "fsdp=2,tensor=4"]
TOL = 1e-5  # max |logit difference| vs one device, float32
DECODE_STEPS = 3
CACHE_LENGTH = 32


def random_params(config: gj.GemmaConfig, seed: int) -> dict:
    """Weights large enough that logits reach ~10 (std 0.02 leaves them near zero and any sharding would pass)."""
    rng = np.random.default_rng(seed)
    abstract = gj.params_of(gj.abstract_model(config))

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        std = 0.15 if "norm" in name else (0.25 if "embed" in name else 0.075)
        return rng.normal(0.0, std, leaf.shape).astype(np.float32)

    return jax.tree.map_with_path(draw, abstract)


def one_device_mesh():
    return shd.make_mesh("fsdp=1", jax.devices()[:1])


def greedy(forward, params, config, mesh, tokens, mask) -> tuple[np.ndarray, np.ndarray, gj.KVCache]:
    """Prefill left-padded prompts into a sharded cache, then decode DECODE_STEPS tokens greedily, one step each.

    Returns the prefill logits [B, T, V], the generated tokens [B, DECODE_STEPS] and the cache.
    """
    cache = shd.init_cache(config, tokens.shape[0], CACHE_LENGTH, jnp.float32, mesh)
    positions = np.cumsum(mask, axis=1) - 1
    logits, cache = forward(params, tokens, positions, mask, cache)
    prefill = np.asarray(logits)
    position = positions[:, -1:] + 1  # [B, 1]
    out = []
    for _ in range(DECODE_STEPS):
        token = np.asarray(logits[:, -1]).argmax(-1)[:, None].astype(np.int32)  # [B, 1]
        out.append(token)
        logits, cache = forward(params, token, position, np.ones_like(token, bool), cache)
        position = position + 1
    return prefill, np.concatenate(out, axis=1), cache


def host_model(config: gj.GemmaConfig, seed: int) -> gj.Transformer:
    """A model whose parameters are numpy arrays: `shard_model` then places them without device-to-device copies."""
    return nnx.merge(nnx.graphdef(gj.abstract_model(config)), random_params(config, seed))


def run(model, mesh, tokens, mask):
    """(model with its params in the mesh's shardings, prefill logits, greedy tokens, final cache)."""
    model = shd.shard_model(model, mesh)
    forward = shd.jit_forward(model, mesh)
    logits, generated, cache = greedy(forward, gj.params_of(model), model.config, mesh, tokens, mask)
    return model, logits, generated, cache


@pytest.fixture(scope="module")
def reference():
    model = host_model(CONFIG, 0)
    tokens, mask = left_padded(np.random.default_rng(1), [12, 9, 12, 5, 12, 11, 7, 12], CONFIG.vocab_size)
    _, logits, generated, _ = run(model, one_device_mesh(), tokens, mask)
    assert np.abs(logits[mask]).max() > 5.0, "logits too small for the comparison to mean anything"
    plain, _ = model(jnp.asarray(tokens), mask=jnp.asarray(mask))  # no mesh, no cache, no jit_forward
    np.testing.assert_allclose(logits[mask], np.asarray(plain)[mask], atol=TOL, rtol=0)
    return model, tokens, mask, logits, generated


def shard_shape(axes, shape, mesh) -> tuple[int, ...]:
    """What LOGICAL_RULES say one device holds (the rules' mesh axes that the mesh has)."""
    sizes = dict(mesh.shape)
    return tuple(
        dim // math.prod(sizes[a] for a in shd.LOGICAL_RULES[name]) for name, dim in zip(axes, shape, strict=True)
    )


# One device's piece of two parameters, worked out by hand: embedding [V=512, D=64] is (vocab, embed);
# the stacked q kernel [G=2, D=64, N=8, H=16] is (layers, embed, heads, head_dim).
HAND_SHARDS = {
    "data=8": ((512, 64), (2, 64, 8, 16)),
    "fsdp=8": ((512, 8), (2, 8, 8, 16)),
    "tensor=8": ((64, 64), (2, 64, 1, 16)),
    "fsdp=2,tensor=4": ((128, 32), (2, 32, 2, 16)),
}


@pytest.mark.parametrize("spec", MESHES)
def test_mesh_matches_one_device(reference, spec):
    model, tokens, mask, want_logits, want_tokens = reference
    mesh = shd.make_mesh(spec)
    sharded, logits, generated, cache = run(model, mesh, tokens, mask)

    np.testing.assert_allclose(logits[mask], want_logits[mask], atol=TOL, rtol=0)
    np.testing.assert_array_equal(generated, want_tokens)

    params = gj.params_of(sharded)
    embedding, q = HAND_SHARDS[spec]
    assert params["embedder"]["embedding"].addressable_shards[0].data.shape == embedding
    assert params["groups"]["layers"][0]["attn"]["q"]["kernel"].addressable_shards[0].data.shape == q
    state = nnx.state(sharded, nnx.Param)
    for path, param in jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        axes = param.get_metadata()["logical_axes"]
        for shard in param[...].addressable_shards:
            assert shard.data.shape == shard_shape(axes, param.shape, mesh), jax.tree_util.keystr(path)

    k = cache.groups[0].k  # [G, B, K, H, S] = [2, 8, 8, 16, 32]: batch over data x fsdp, kv heads over tensor
    assert k.addressable_shards[0].data.shape == shard_shape(("layers", *kv_cache.K_AXES), k.shape, mesh)


def test_sampler_greedy_tokens_match_one_device(reference, tiny_tokenizer):
    """`Sampler.generate` (bucketed prefill + while_loop decode) on a model sharded fsdp=2 x tensor=4, its cache
    sharded and its activation constraints active, picks the one-device greedy tokens."""
    model, tokens, mask, _, want = reference
    prompts = [row[keep].tolist() for row, keep in zip(tokens, mask, strict=True)]
    mesh = shd.make_mesh("fsdp=2,tensor=4")
    sharded = shd.shard_model(model, mesh)
    sampler = Sampler(sharded, tiny_tokenizer, cache_length=CACHE_LENGTH, decode_steps=4, mesh=mesh)
    got = [c.token_ids for c in sampler.generate(prompts, max_new_tokens=DECODE_STEPS)]
    # the sampler stops a row at a stop token; the reference loop does not
    assert got == [w[: len(g)].tolist() for g, w in zip(got, want, strict=True)]
    assert sum(map(len, got)) > len(got)


def test_8bit_cache_is_sharded_like_its_keys(reference, tiny_tokenizer):
    """An int8 cache's scales [G, B, K, 1, S] split as its keys over batch and kv heads (SCALE_AXES); the sharded
    Sampler decodes through it to the one-device int8 tokens."""
    model, tokens, mask, _, _ = reference
    prompts = [row[keep].tolist() for row, keep in zip(tokens, mask, strict=True)]
    one = Sampler(model, tiny_tokenizer, cache_length=CACHE_LENGTH, decode_steps=4, cache_dtype="int8")
    want = [c.token_ids for c in one.generate(prompts, max_new_tokens=DECODE_STEPS)]
    mesh = shd.make_mesh("fsdp=2,tensor=4")
    sharded = Sampler(
        shd.shard_model(model, mesh), tiny_tokenizer, cache_length=CACHE_LENGTH, decode_steps=4, cache_dtype="int8",
        mesh=mesh,
    )  # fmt: skip
    cache = sharded.new_cache(len(prompts))
    for layer in cache.groups:
        g, b, k, h, s = layer.k.addressable_shards[0].data.shape
        assert (g, b, k, h, s) == (2, 4, 2, 16, layer.positions.shape[-1])  # batch 8 / fsdp=2, kv heads 8 / tensor=4
        for scale in (layer.k_scale, layer.v_scale):
            assert scale.dtype == jnp.float32 and scale.addressable_shards[0].data.shape == (g, b, k, 1, s)
    assert [c.token_ids for c in sharded.generate(prompts, max_new_tokens=DECODE_STEPS)] == want


def test_kv_heads_that_do_not_divide_tensor_are_replicated():
    """GQA with 2 kv heads under tensor=4: k/v and their cache replicate over tensor; q stays split; a batch
    of 3 (not divisible by fsdp=2) is replicated. Logits still match one device."""
    config = gj.gemma2_tiny(num_layers=5)  # 4 heads, 2 kv heads
    model = host_model(config, 2)
    tokens, mask = left_padded(np.random.default_rng(3), [10, 6, 10], config.vocab_size)
    mesh = shd.make_mesh("fsdp=2,tensor=4")

    sh = shd.param_shardings(model, mesh)["groups"]["layers"][0]["attn"]
    assert sh["k"]["kernel"].spec == P(None, "fsdp", None, None)
    assert sh["q"]["kernel"].spec == P(None, "fsdp", "tensor", None)
    cache = jax.eval_shape(lambda: gj.KVCache.create(config, 3, CACHE_LENGTH, jnp.float32))
    assert shd.cache_shardings(cache, mesh).groups[0].k.spec == P(None, None, None, None, None)

    sharded = shd.shard_model(model, mesh)
    got, _ = shd.jit_forward(sharded, mesh)(gj.params_of(sharded), tokens, None, mask)
    want, _ = shd.jit_forward(model, one_device_mesh())(gj.params_of(model), tokens, None, mask)
    np.testing.assert_allclose(np.asarray(got)[mask], np.asarray(want)[mask], atol=TOL, rtol=0)


def test_init_sharded_equals_one_device_init_and_is_split():
    config = gj.gemma2_tiny(num_heads=8, num_kv_heads=8, num_layers=2)
    mesh = shd.make_mesh("fsdp=2,tensor=4")
    model = shd.init_sharded(config, mesh, seed=3)
    want = gj.params_of(gj.Transformer(config, rngs=nnx.Rngs(3)))
    got = gj.params_of(model)
    # jit and eager round the normal sampler's last bit differently
    jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-7), got, want)
    embedding = got["embedder"]["embedding"]
    assert {s.data.shape for s in embedding.addressable_shards} == {(128, 32)}  # no device holds all of it
    assert model.groups.layers[0].attn.q.kernel.get_metadata()["logical_axes"] == (
        "layers",
        "embed",
        "heads",
        "head_dim",
    )


def test_optimizer_state_is_sharded_like_the_params():
    mesh = shd.make_mesh("fsdp=2,tensor=4")
    params = gj.params_of(shd.shard_model(host_model(CONFIG, 0), mesh))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    state = shd.init_optimizer(tx, params, mesh)
    adam = state[1][0]
    for moments in (adam.mu, adam.nu):
        jax.tree.map(lambda m, p: assert_sharded_as(m, p.sharding), moments, params)
    assert adam.count.sharding.is_fully_replicated


def test_checkpoint_restores_into_the_shardings(tmp_path):
    model = host_model(CONFIG, 0)
    path = checkpoint.save(tmp_path / "ckpt", CONFIG, gj.params_of(model), dtype="float32")
    mesh = shd.make_mesh("fsdp=2,tensor=4")
    shardings = shd.param_shardings(gj.abstract_model(CONFIG), mesh)
    _, params = checkpoint.load(path, shardings=shardings)
    jax.tree.map(lambda x, s: assert_sharded_as(x, s), params, shardings)
    jax.tree.map(lambda x, w: np.testing.assert_array_equal(np.asarray(x), np.asarray(w)), params, gj.params_of(model))
    loaded = checkpoint.load_model(path, dtype=jnp.float32, mesh=mesh)
    jax.tree.map(lambda x, s: assert_sharded_as(x, s), gj.params_of(loaded), shardings)


def assert_sharded_as(x: jax.Array, sharding) -> None:
    assert x.sharding.is_equivalent_to(sharding, x.ndim), (x.sharding, sharding)
    assert {s.data.shape for s in x.addressable_shards} == {sharding.shard_shape(x.shape)}


# ------------------------------------------------------------------------------ meshes, rules, errors


@pytest.mark.parametrize(
    ("spec", "shape"),
    [
        (None, (1, 8, 1)),
        ("data", (8, 1, 1)),
        ("tensor", (1, 1, 8)),
        ("fsdp_tensor", (1, 2, 4)),
        ("fsdp=2,tensor=4", (1, 2, 4)),
        (" data = 2 , fsdp=-1 ", (2, 4, 1)),
        ({"tensor": 2, "data": 4}, (4, 1, 2)),
    ],
)
def test_make_mesh(spec, shape):
    mesh = shd.make_mesh(spec)
    assert mesh.axis_names == shd.MESH_AXES
    assert tuple(mesh.shape.values()) == shape


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("fsdp=4,tensor=4", "mesh fsdp=4,tensor=4 needs 16 devices, but there are 8"),
        ("fsdp=3", "needs 3 devices, but there are 8"),
        ("tensor=3,fsdp=-1", "multiple of 3 devices, but there are 8"),
        ("model=8", "unknown mesh axis 'model'"),
        ({"model": 8}, "unknown mesh axis 'model'"),
        ("fsdp=two", "mesh axis 'fsdp' has size 'two'"),
        ("fsdp=0", "mesh axis 'fsdp' has size 0"),
        ({"tensor": 2.5}, "mesh axis 'tensor' has size 2.5"),
        ("fsdp=-1,tensor=-1", "only one mesh axis may be -1"),
        ("fsdp=2,fsdp=4", "'fsdp' appears twice"),
        ("fsdp:8", "is not axis=size"),
    ],
)
def test_bad_mesh_is_named(spec, message):
    with pytest.raises(shd.ShardingError, match=message.replace("(", r"\(")):
        shd.make_mesh(spec)


def test_indivisible_parameter_names_axis_and_sizes():
    abstract = gj.abstract_model(gj.gemma2_tiny())  # 4 heads
    with pytest.raises(shd.ShardingError) as e:
        shd.param_shardings(abstract, shd.abstract_mesh("tensor=8", 8))
    msg = str(e.value)
    assert "['attn']['q']['kernel']" in msg or "['attn']['o']['kernel']" in msg
    assert "logical axis 'heads' has size 4, which mesh axes tensor=8 (= 8) do not divide" in msg


def test_logical_spec_rules():
    mesh = shd.abstract_mesh("data=2,fsdp=2,tensor=2", 8)
    assert shd.logical_spec(("batch", "length", "act_vocab"), mesh, (4, 7, 16)) == P(("data", "fsdp"), None, "tensor")
    assert shd.logical_spec(("batch", None), mesh, (2, 7)) == P("data", None)  # shrinks to the axes that divide
    assert shd.logical_spec(("batch",), mesh, (1,)) == P(None)
    assert shd.logical_spec(("vocab", "embed"), shd.abstract_mesh("data", 8), (512, 64)) == P(None, None)
    with pytest.raises(shd.ShardingError, match="unknown logical axis 'model'"):
        shd.logical_spec(("model",), mesh, (8,))
    with pytest.raises(shd.ShardingError, match="would shard two dimensions"):
        shd.logical_spec(("heads", "mlp"), mesh, (8, 8))
    with pytest.raises(shd.ShardingError, match="2 logical axes"):
        shd.logical_spec(("heads", "mlp"), mesh, (8,))


def test_2b_under_tensor_8_replicates_only_kv():
    """Gemma-2 2B: 8 query heads split 8 ways, 4 kv heads replicated over tensor, nothing allocated."""
    mesh = shd.abstract_mesh("tensor=8", 8)
    attn = shd.param_shardings(gj.abstract_model(gj.gemma2_2b()), mesh)["groups"]["layers"][0]["attn"]
    assert attn["q"]["kernel"].spec == P(None, None, "tensor", None)
    assert attn["k"]["kernel"].spec == P(None, None, None, None)


def test_constrain_is_a_no_op_without_a_mesh():
    x = jnp.ones((2, 3, 4))
    assert shd.constrain(x, shd.RESIDUAL) is x


@pytest.fixture
def initialize_calls(monkeypatch):
    """Record what jax.distributed.initialize is asked; with no arguments it finds no cluster, as on this machine.

    (The real call must come before JAX starts; tests/test_multihost.py makes it in fresh processes.)
    """
    calls = []

    def initialize(*args):
        calls.append(args)
        if not args:
            raise ValueError("coordinator_address should be defined.")

    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    return calls


def test_cli_args_build_the_mesh(initialize_calls):
    parser = argparse.ArgumentParser()
    shd.add_cli_args(parser)
    mesh = shd.mesh_from_args(parser.parse_args(["--mesh", "fsdp=2,tensor=4"]))
    assert initialize_calls == [()]  # cluster auto-detection tried, nothing found: a single process
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 4}
    assert shd.is_primary_host()

    shd.mesh_from_args(parser.parse_args(["--coordinator", "10.0.0.1:1234", "--num-processes", "1"]))
    assert initialize_calls[-1] == ("10.0.0.1:1234", 1, None)


def test_distributed_settings_from_env(initialize_calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    assert not shd.maybe_initialize_distributed()  # (the fake joined nothing: still one process)
    assert initialize_calls == [("10.0.0.1:1234", 4, 2)]
    assert not shd.maybe_initialize_distributed(process_id=0)
    assert initialize_calls[-1] == ("10.0.0.1:1234", 4, 0)  # a flag beats its variable
    monkeypatch.setenv("JAX_PROCESS_ID", "two")
    with pytest.raises(shd.ShardingError, match=r"\$JAX_PROCESS_ID should be an integer, got 'two'"):
        shd.maybe_initialize_distributed()


def test_no_cluster_after_jax_started_is_one_process(monkeypatch, caplog):
    """In a notebook or a test JAX is already running: auto-detection can't join anything, and says so."""
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    jax.devices()
    assert shd.maybe_initialize_distributed() is False
    assert "not joining a multi-host run" in caplog.text


def test_memory_table_script_matches_docs():
    """benchmarks/memory_table.py runs (shapes only) and docs/sharding.md holds its current output."""
    script = runpy.run_path(str(REPO / "benchmarks" / "memory_table.py"))
    table = script["table"]()
    docs = (REPO / "docs" / "sharding.md").read_text()
    assert table in docs and script["cache_table"]() in docs, "rerun benchmarks/memory_table.py into the docs"
    readme_rows = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| 9b |")]
    assert readme_rows and all(line in table.splitlines() for line in readme_rows)
    row = script["row"]("9b", "v5e-8", "fsdp=8")  # fsdp=8 splits every parameter and the batch of 8 eight ways
    params = gj.params_of(gj.abstract_model(gj.gemma2_9b()))
    assert row.weights * 8 == 2 * sum(x.size for x in jax.tree.leaves(params))
    slots = 8 * 21 * (16384 + 4096)  # 8 rows x 21 x (global + sliding ring) slots
    assert row.cache * 8 == slots * (2 * 8 * 256 * 2 + 4)  # k and v: 8 kv heads x 256 bf16; positions int32
    per_sequence = slots // 8
    for dtype in ("fp8", "int8"):  # keys and values of 8 kv heads x 256 in one byte, a float32 scale per head each
        assert script["cache_parts"](dtype) == (per_sequence * 2 * 8 * 256, per_sequence * 2 * 8 * 4, per_sequence * 4)
