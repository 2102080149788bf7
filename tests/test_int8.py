"""int8 weights and quantization as data: per-channel int8 numerics, the QArray pytree, int8 models (weight-only
and W8A8 with int8 x int8 -> int32 dots), int8 checkpoints and `--dtype int8`; a model is never changed in place."""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_model
from flax import nnx
from test_fp8 import projection_bytes, random_params

import gemma_jax as gj
from gemma_jax import checkpoint as ck
from gemma_jax import fp8, quant, sample, sharding
from gemma_jax.checkpoint_errors import CheckpointError
from gemma_jax.linear import Linear

CONFIG = gj.gemma2_tiny(num_layers=3)  # one scanned (sliding, global) group and a tail layer


@pytest.fixture(scope="module")
def params() -> dict:
    return random_params(CONFIG)


@pytest.fixture(scope="module")
def int8_params(params) -> dict:
    return fp8.quantize_params(CONFIG, params, storage="int8")


@pytest.fixture(scope="module")
def prompts():
    return jnp.asarray(np.random.default_rng(7).integers(1, CONFIG.vocab_size, (8, 32)), jnp.int32)


def linears(model) -> list[Linear]:
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, Linear)]


def test_int8_kernel_is_symmetric_per_channel_within_half_a_step():
    """Channels spanning 6 decades each get scale absmax/127; every element is within half a step of w."""
    rng = np.random.default_rng(1)
    w = (rng.normal(size=(64, 4, 16)) * 10.0 ** rng.uniform(-3, 3, (1, 4, 16))).astype(np.float32)
    w[:, 1, 3] = 0.0
    q, scale = quant.quantize_kernel(jnp.asarray(w), 0, dtype=quant.INT8)
    assert q.dtype == jnp.int8 and q.shape == (4, 16, 64) and scale.shape == (4, 16)
    np.testing.assert_allclose(scale, np.where(w.any(0), np.abs(w).max(0) / 127, 1.0), rtol=1e-6)
    assert int(jnp.min(q)) >= -127  # symmetric: -128 is never used
    dq = np.asarray(quant.dequantize_kernel(q, scale, 0))
    assert np.all(np.abs(dq - w) <= np.asarray(scale)[None] * (0.5 + 1e-6))
    assert np.all(dq[:, 1, 3] == 0.0)


def test_qarray_is_a_pytree_that_einsum_takes_in_place_of_the_kernel():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 3, 32)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(32, 4, 8)), jnp.float32)
    for dtype in (quant.FP8, quant.INT8):
        values, scale = quant.quantize_kernel(w, 0, dtype=dtype)
        qw = quant.QArray(values, scale)
        assert jax.tree.leaves(qw) == [values, scale] and qw.reduced_ndim == 1
        doubled = jax.tree.map(lambda a: a, qw)  # a tree map keeps the type and its static `w8a8`
        assert isinstance(doubled, quant.QArray) and doubled.w8a8 is False
        want = jnp.einsum("BTD,DNH->BTNH", x, quant.dequantize_kernel(values, scale, 0))
        got = jax.jit(quant.einsum, static_argnums=0)("BTD,DNH->BTNH", x, qw)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_quantize_model_builds_a_new_model_and_leaves_the_old_one(params):
    """Quantization is data: the float model keeps its float kernels and no `scale`; the result was built 8-bit."""
    model = gj.from_params(CONFIG, params)
    before = jax.tree.map(np.asarray, gj.params_of(model))
    quantized = fp8.quantize_model(model, storage="int8")
    assert {m.quant for m in linears(model)} == {None} and {m.scale for m in linears(model)} == {None}
    for got, want in zip(jax.tree.leaves(gj.params_of(model)), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(got, want)
    assert {m.quant for m in linears(quantized)} == {fp8.WEIGHT_ONLY}
    assert {m.kernel.get_value().dtype for m in linears(quantized)} == {jnp.dtype(jnp.int8)}
    # W8A8 of the int8 model: same int8 values, only the mode differs.
    w8a8 = fp8.quantize_model(quantized, fp8.W8A8, emulate=True)
    assert {m.quant for m in linears(w8a8)} == {fp8.W8A8} and {m.quant for m in linears(quantized)} == {"weight_only"}
    for got, want in zip(jax.tree.leaves(gj.params_of(w8a8)), jax.tree.leaves(gj.params_of(quantized)), strict=True):
        np.testing.assert_array_equal(got, want)


# Measured on these 256 random tokens, as max |logits error| / max |logit| vs float32:
#   weight-only: top-1 1.000, error 0.008;   W8A8 (emulated): top-1 1.000, error 0.012 (FP8: 0.026 / 0.042).
@pytest.mark.parametrize(("mode", "max_rel_error"), [("weight_only", 0.015), ("w8a8", 0.025)])
def test_tiny_int8_model_matches_float32(params, int8_params, prompts, mode, max_rel_error):
    forward = nnx.jit(lambda m, t: m(t)[0])
    want = np.asarray(forward(gj.from_params(CONFIG, params), prompts))
    got = np.asarray(forward(fp8.from_params(CONFIG, int8_params, dtype=jnp.float32, mode=mode, emulate=True), prompts))
    top1 = float(np.mean(got.argmax(-1) == want.argmax(-1)))
    rel_error = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"int8 {mode}: top-1 agreement {top1:.3f}, max |logits error| / max |logit| {rel_error:.4f}")
    assert top1 >= 0.99
    assert rel_error <= max_rel_error


def int8_dots(hlo: str) -> int:
    """stablehlo.dot_general ops with two int8 operands and an int32 result."""
    return len(
        re.findall(r"stablehlo\.dot_general .*: \(tensor<[0-9x]*xi8>, tensor<[0-9x]*xi8>\) -> tensor<[0-9x]*xi32>", hlo)
    )


def test_int8_w8a8_lowers_to_int8_dots_on_cpu(int8_params, prompts):
    """Every projection's dot is int8 x int8 -> int32, in the lowered program and in the CPU's optimized HLO."""
    forward = nnx.jit(lambda m, t: m(t)[0])
    w8a8 = fp8.from_params(CONFIG, int8_params, mode=fp8.W8A8, emulate=True)
    lowered = forward.lower(w8a8, prompts)
    assert int8_dots(lowered.as_text()) == 21  # the scan body's 2 layers + the tail layer, 7 projections each
    compiled = lowered.compile().as_text()
    assert len(re.findall(r"= s32\[[0-9,]*\]\{[0-9,]*\} dot\(", compiled)) == 21, compiled
    weight_only = fp8.from_params(CONFIG, int8_params, mode=fp8.WEIGHT_ONLY)
    assert int8_dots(forward.lower(weight_only, prompts).as_text()) == 0


def test_int8_w8a8_falls_back_to_weight_only_without_a_native_int8_matmul(params):
    assert not quant.native_int8_dot()  # the suite runs on CPU
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = fp8.quantize_model(gj.from_params(CONFIG, params), fp8.W8A8, storage="int8")
    assert [str(w.message) for w in caught if "W8A8" in str(w.message)] == [
        "W8A8 needs a native int8 matmul (TPU); cpu has none, so INT8 weights run weight-only"
    ]
    assert {m.quant for m in linears(model)} == {fp8.WEIGHT_ONLY}
    with pytest.raises(quant.QuantError, match="unknown 8-bit storage 'int4'"):
        fp8.quantize_params(CONFIG, params, storage="int4")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_tokenizer):
    """A tiny random HF checkpoint converted to bf16 and to int8."""
    directory = tmp_path_factory.mktemp("hf") / "tiny"
    hf_model(CONFIG, seed=3).save_pretrained(directory)
    shutil.copyfile(tiny_tokenizer.model_file, directory / "tokenizer.model")
    root = tmp_path_factory.mktemp("orbax")
    out = {dtype: ck.convert_hf(directory, root / dtype, dtype=dtype, progress=False) for dtype in ("bfloat16", "int8")}
    return directory, out


def assert_same_tree(got: dict, want: dict) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def test_int8_checkpoint_round_trips_serves_and_halves_projection_bytes(converted, tmp_path):
    _, paths = converted
    config, tree = ck.load(paths["int8"])
    assert fp8.storage_of(tree) == "int8"
    assert json.loads((paths["int8"] / "gemma_jax.json").read_text())["dtype"] == "int8"
    # Stored exactly as quantize_params makes it from the bf16 weights, in about half the projection bytes.
    assert_same_tree(tree, fp8.quantize_params(config, ck.load(paths["bfloat16"])[1], storage="int8"))
    int8_bytes, bf16_bytes = (projection_bytes(ck._stored_tree(paths[d]), CONFIG) for d in ("int8", "bfloat16"))
    assert int8_bytes / bf16_bytes <= 0.55, int8_bytes / bf16_bytes

    # An int8 checkpoint serves as stored; a bf16 one quantized at load to int8 is the same model.
    tokens = jnp.asarray(np.random.default_rng(5).integers(1, CONFIG.vocab_size, (4, 16)), jnp.int32)
    forward = nnx.jit(lambda m, t: m(t)[0])
    served = ck.load_model(paths["int8"], dtype=jnp.float32)
    on_load = ck.load_model(paths["bfloat16"], dtype=jnp.float32, storage="int8")
    np.testing.assert_allclose(forward(on_load, tokens), forward(served, tokens), atol=1e-5, rtol=0)
    with pytest.raises(CheckpointError, match="stores int8 projections, not fp8"):
        ck.load_model(paths["int8"], storage="fp8")

    # Restored straight into the shardings of the int8 model's logical axes.
    mesh = sharding.make_mesh("fsdp=2,tensor=4")
    placed = gj.params_of(ck.load_model(paths["int8"], mesh=mesh))
    want = sharding.param_shardings(fp8.abstract_model(CONFIG, storage="int8"), mesh)
    for leaf, sh in zip(jax.tree.leaves(placed), jax.tree.leaves(want), strict=True):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)

    # save(dtype="int8") stores int8 params as they are; other dtypes are refused before anything is written.
    assert_same_tree(ck.load(ck.save(tmp_path / "again", config, tree, dtype="int8"))[1], tree)
    with pytest.raises(CheckpointError, match="these are INT8 params: save them with dtype='int8', not 'fp8'"):
        ck.save(tmp_path / "bad", config, tree, dtype="fp8")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(CheckpointError, match="is an INT8 checkpoint; export the bf16"):
        ck.export_hf(paths["int8"], tmp_path / "exported")


def tree_bytes(stored: dict) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(stored))


def test_int8_checkpoint_is_at_most_0_55x_bf16_with_the_embedding_per_row(converted, params):
    """The whole int8 checkpoint, embedding included (int8 [V, D] + a float32 scale per vocab row), is <= 0.55x
    the bf16 one (0.531x here; 0.638x with a bf16 embedding). FP8 keeps its float embedding."""
    _, paths = converted
    stored = {d: ck._stored_tree(paths[d]) for d in ("int8", "bfloat16")}
    embedder = stored["int8"]["embedder"]
    assert (embedder["embedding"].dtype, embedder["embedding"].shape) == (
        np.int8,
        (CONFIG.vocab_size, CONFIG.hidden_size),
    )
    assert (embedder["scale"].dtype, embedder["scale"].shape) == (np.float32, (CONFIG.vocab_size,))
    ratio = tree_bytes(stored["int8"]) / tree_bytes(stored["bfloat16"])
    assert ratio <= 0.55, ratio
    fp8_tree = fp8.quantize_params(CONFIG, params, storage="fp8")
    assert list(fp8_tree["embedder"]) == ["embedding"] and fp8_tree["embedder"]["embedding"].dtype == np.float32
    dequantized = fp8.dequantize_params(CONFIG, fp8.quantize_params(CONFIG, params, storage="int8"))["embedder"]
    step = np.abs(params["embedder"]["embedding"]).max(1, keepdims=True) / 127  # per row
    assert np.all(np.abs(dequantized["embedding"] - params["embedder"]["embedding"]) <= step * (0.5 + 1e-6))


def test_int8_embedding_lookup_gathers_rows_and_logits_use_the_int8_table(int8_params):
    """encode dequantizes only the gathered rows (no [V, D] float table in its program); decode's logits are
    h . values^T times each row's scale, which equals h . (dequantized table)^T."""
    model = fp8.from_params(CONFIG, int8_params, dtype=jnp.float32)
    embedder = model.embedder
    table = quant.QArray(int8_params["embedder"]["embedding"], int8_params["embedder"]["scale"]).dequantize()
    tokens = jnp.asarray([[3, 500, 7], [0, 1, 511]], jnp.int32)
    np.testing.assert_allclose(embedder.encode(tokens), table[tokens] * CONFIG.hidden_size**0.5, rtol=1e-6)
    jaxpr = str(jax.make_jaxpr(embedder.encode)(tokens))
    assert f"f32[{CONFIG.vocab_size},{CONFIG.hidden_size}]" not in jaxpr and "i8[2,3,64]" in jaxpr, jaxpr
    h = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, CONFIG.hidden_size)), jnp.float32)
    logits = embedder.decode(h)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, jnp.einsum("BTD,VD->BTV", h, table), rtol=1e-5, atol=1e-5)
    bf16 = fp8.from_params(CONFIG, int8_params, dtype=jnp.bfloat16).embedder.decode(h.astype(jnp.bfloat16))
    assert bf16.dtype == jnp.float32  # float32 logits from a bf16 model, as with a float table


def test_sample_cli_int8(converted, tmp_path, monkeypatch, capsys):
    """`--dtype int8` converts the HF source to an int8 checkpoint and samples from it."""
    monkeypatch.setattr(sample.sharding, "maybe_initialize_distributed", lambda *a: False)
    src, _ = converted
    argv = ["--checkpoint", str(src), "--cache-dir", str(tmp_path), "--cache-length", "32", "--max-new-tokens", "4"]
    assert sample.main([*argv, "--json", "--prompt", "Hello", "--dtype", "int8"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert 1 <= len(row["token_ids"]) <= 4 and row["finish_reason"] in ("stop", "length")
    (cached,) = tmp_path.iterdir()
    assert json.loads((cached / "gemma_jax.json").read_text())["dtype"] == "int8"
