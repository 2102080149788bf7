"""FP8: e4m3 kernel numerics, bad input, the quantized model's quality vs float32, memory and the lowered HLO."""

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
import safetensors.numpy
from conftest import hf_logits, hf_model
from flax import nnx

import gemma_jax as gj
from gemma_jax import checkpoint as ck
from gemma_jax import fp8, quant, sample, sharding
from gemma_jax.checkpoint_errors import CheckpointError
from gemma_jax.linear import Linear

CONFIG = gj.gemma2_tiny(num_layers=3)  # one scanned (sliding, global) group and a tail layer


def random_params(config: gj.GemmaConfig, seed: int = 0) -> dict:
    """Float32 params with the spreads of conftest's `hf_model` (norms 0.3, embedding 0.5, projections 0.15)."""
    rng = np.random.default_rng(seed)
    abstract = gj.params_of(gj.abstract_model(config))
    stds = {"embedding": 0.5, "scale": 0.3, "kernel": 0.15}
    return jax.tree_util.tree_map_with_path(
        lambda path, x: rng.normal(0.0, stds[path[-1].key], x.shape).astype(np.float32), abstract
    )


@pytest.fixture(scope="module")
def params() -> dict:
    return random_params(CONFIG)


@pytest.fixture(scope="module")
def fp8_params(params) -> dict:
    return fp8.quantize_params(CONFIG, params)


def per_channel_relative_error(w: np.ndarray, contracting: tuple[int, ...]) -> np.ndarray:
    q, scale = quant.quantize_kernel(jnp.asarray(w), contracting)
    err = np.asarray(quant.dequantize_kernel(q, scale, contracting)) - w
    return np.sqrt((err**2).sum(contracting) / (w**2).sum(contracting))


@pytest.mark.parametrize(
    ("shape", "contracting"),
    [((64, 4, 16), (0,)), ((4, 16, 64), (0, 1)), ((2, 64, 128), (1,)), ((2, 128, 64), (1,))],
    ids=["q", "o", "stacked-gate", "stacked-down"],
)
def test_quantize_dequantize_error_per_channel(shape, contracting):
    """Channels spanning 6 decades each get their own scale: relative error <= 1/16 (e4m3's 3 mantissa bits).

    Measured: ~0.018 per channel for Gaussian weights; the element bound allows half an e4m3 step,
    or half a subnormal step (2^-10 of the scale) for tiny elements.
    """
    rng = np.random.default_rng(1)
    out_shape = tuple(d for i, d in enumerate(shape) if i not in contracting)
    channel_size = 10.0 ** rng.uniform(-3, 3, out_shape)
    w = rng.normal(size=shape) * np.expand_dims(channel_size, contracting)
    w = w.astype(np.float32)
    rel = per_channel_relative_error(w, contracting)
    assert rel.shape == out_shape
    assert rel.max() <= 1 / 16, rel.max()

    q, scale = quant.quantize_kernel(jnp.asarray(w), contracting)
    keep = [a for a in range(w.ndim) if a not in contracting]
    assert q.dtype == jnp.float8_e4m3fn and q.shape == tuple(shape[a] for a in keep + list(contracting))
    assert scale.dtype == jnp.float32 and scale.shape == out_shape
    dq = np.asarray(quant.dequantize_kernel(q, scale, contracting))
    step = np.expand_dims(np.asarray(scale), contracting)
    assert np.all(np.abs(dq - w) <= np.abs(w) / 16 + step * 2.0**-10)


def test_zero_channel_has_unit_scale_and_no_nan():
    w = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    w[:, 2] = 0.0
    q, scale = quant.quantize_kernel(jnp.asarray(w), 0)
    assert float(scale[2]) == 1.0
    dq = np.asarray(quant.dequantize_kernel(q, scale, 0))
    assert np.all(np.isfinite(dq)) and np.all(dq[:, 2] == 0.0)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_nonfinite_weight_names_the_tensor(params, bad):
    broken = jax.tree.map(lambda x: x, params)
    kernel = broken["groups"]["layers"][1]["mlp"]["up"]["kernel"].copy()
    kernel[0, 3, 5] = bad
    broken["groups"]["layers"][1]["mlp"]["up"]["kernel"] = kernel
    with pytest.raises(quant.Fp8Error, match=r"groups\.layers\.1\.mlp\.up\.kernel: 1 of 128 output channels"):
        fp8.quantize_params(CONFIG, broken)


def test_unsupported_einsum_is_refused():
    with pytest.raises(quant.Fp8Error, match="not of the form"):
        quant.split_spec("BTD,ND->BTN")  # kernel's contracting axis is not leading


def test_dequantize_params_restores_the_float_tree(params, fp8_params):
    restored = fp8.dequantize_params(CONFIG, fp8_params)
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1 / 16, atol=1e-3)


def test_quantized_tree_layout_and_axes(fp8_params):
    """Kernels become e4m3 [..., out, in] with f32 scales [..., out]; logical axes are permuted alike."""
    model = fp8.abstract_model(CONFIG, param_dtype=jnp.float32, mode=fp8.WEIGHT_ONLY)
    assert jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), gj.params_of(model)) == jax.tree.map(
        lambda x: (x.shape, jnp.dtype(x.dtype)), fp8_params
    )
    float_linears = dict(nnx.iter_modules(gj.abstract_model(CONFIG)))
    count = 0
    for path, linear in nnx.iter_modules(model):
        if not isinstance(linear, Linear):
            continue
        count += 1
        before = float_linears[path].kernel
        axes, q_axes = before.get_metadata()["logical_axes"], linear.kernel.get_metadata()["logical_axes"]
        # Same axis names with the same sizes: the sharding rules place the FP8 kernel like the float one.
        assert sorted(zip(axes, before.get_value().shape, strict=True)) == sorted(
            zip(q_axes, linear.kernel.get_value().shape, strict=True)
        )
        assert linear.scale.get_metadata()["logical_axes"] == q_axes[: len(linear.scale.get_value().shape)]
        assert linear.quant == fp8.WEIGHT_ONLY
    assert count == 7 * 3  # 7 projections in each of the stacked group's 2 layers and in the tail layer


def test_projection_bytes_of_9b_are_at_most_055_of_bf16():
    """Weight bytes of every projection, FP8 kernel + scale vs bf16 (shapes only: nothing allocated)."""

    def projection_bytes(model) -> int:
        return sum(
            x.get_value().size * jnp.dtype(x.get_value().dtype).itemsize
            for _, m in nnx.iter_modules(model)
            if isinstance(m, Linear)
            for x in (m.kernel, getattr(m, "scale", None))
            if x is not None
        )

    config = gj.gemma2_9b()
    bf16 = projection_bytes(gj.abstract_model(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
    fp8_bytes = projection_bytes(fp8.abstract_model(config))
    assert fp8_bytes / bf16 <= 0.55, fp8_bytes / bf16


def test_w8a8_falls_back_to_weight_only_with_one_warning_without_native_fp8(params):
    assert not quant.native_fp8_dot()  # the suite runs on CPU
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = fp8.quantize_model(gj.from_params(CONFIG, params), fp8.W8A8)
    assert [str(w.message) for w in caught if "W8A8" in str(w.message)] == [
        "W8A8 needs a native FP8 matmul (NVIDIA compute capability >= 8.9); cpu has none, so FP8 weights run "
        "weight-only"
    ]
    assert {m.quant for _, m in nnx.iter_modules(model) if isinstance(m, Linear)} == {fp8.WEIGHT_ONLY}
    with pytest.raises(ValueError, match="unknown FP8 mode 'int8'"):
        fp8.resolve_mode("int8")


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(7)
    return jnp.asarray(rng.integers(1, CONFIG.vocab_size, (8, 32)), jnp.int32)


@pytest.fixture(scope="module")
def float32_logits(params, prompts):
    logits, _ = nnx.jit(lambda m, t: m(t))(gj.from_params(CONFIG, params), prompts)
    return np.asarray(logits)


# Measured on these 256 random tokens (logits up to ~25 under the 30 softcap), as max |logits error| / max |logit|:
#   weight-only: top-1 agreement 1.000, error 0.026;   W8A8: top-1 agreement 1.000, error 0.042.
# (benchmarks/fp8.py --quality-only, 4 models x 512 tokens: top-1 1.0000 and 0.9995.)
# Random weights make every layer matter, a harder case than a trained model; the bounds sit just
# past what was measured.
@pytest.mark.parametrize(("mode", "min_top1", "max_rel_error"), [("weight_only", 0.99, 0.035), ("w8a8", 0.99, 0.055)])
def test_tiny_model_matches_float32(fp8_params, prompts, float32_logits, mode, min_top1, max_rel_error):
    model = fp8.from_params(CONFIG, fp8_params, dtype=jnp.float32, mode=mode, emulate=True)
    logits, _ = nnx.jit(lambda m, t: m(t))(model, prompts)
    logits = np.asarray(logits)
    top1 = float(np.mean(logits.argmax(-1) == float32_logits.argmax(-1)))
    rel_error = float(np.abs(logits - float32_logits).max() / np.abs(float32_logits).max())
    print(f"{mode}: top-1 agreement {top1:.3f}, max |logits error| / max |logit| {rel_error:.3f}")
    assert top1 >= min_top1
    assert rel_error <= max_rel_error


def at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def test_fp8_params_shard_like_bf16_and_sharded_w8a8_matches(fp8_params, prompts):
    """Each FP8 kernel dimension gets the mesh axes its float twin gets (by logical name); scales follow."""
    mesh = sharding.make_mesh("fsdp=2,tensor=4")
    float_model, fp8_model = gj.abstract_model(CONFIG), fp8.abstract_model(CONFIG)
    float_specs = sharding.param_shardings(float_model, mesh)
    fp8_specs = sharding.param_shardings(fp8_model, mesh)
    float_linears = dict(nnx.iter_modules(float_model))
    for path, linear in nnx.iter_modules(fp8_model):
        if isinstance(linear, Linear):
            before = dict(
                zip(float_linears[path].kernel.logical_axes, at(float_specs, path)["kernel"].spec, strict=True)
            )
            after = dict(zip(linear.kernel.logical_axes, at(fp8_specs, path)["kernel"].spec, strict=True))
            scale = dict(zip(linear.scale.logical_axes, at(fp8_specs, path)["scale"].spec, strict=True))
            assert after == before and scale.items() <= before.items()

    model = fp8.from_params(CONFIG, fp8_params, dtype=jnp.float32, mode=fp8.W8A8, emulate=True)
    want, _ = nnx.jit(lambda m, t: m(t))(model, prompts)
    sharded = sharding.shard_model(model, mesh)
    got, _ = sharding.jit_forward(sharded, mesh)(gj.params_of(sharded), np.asarray(prompts))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-3, rtol=0)


def fp8_dots(hlo: str) -> int:
    """stablehlo.dot_general ops whose two operands are both e4m3."""
    return len(re.findall(r"stablehlo\.dot_general .*: \(tensor<[0-9x]*xf8E4M3FN>, tensor<[0-9x]*xf8E4M3FN>\)", hlo))


def test_w8a8_lowers_to_fp8_dots(fp8_params, prompts):
    """Every projection's dot keeps e4m3 operands (the pattern XLA:GPU rewrites to cuBLASLt's FP8 GEMM).

    On a GPU with native FP8 the optimized HLO must contain `__cublas$lt$matmul$f8`.
    """
    forward = nnx.jit(lambda m, t: m(t)[0])
    w8a8 = fp8.from_params(CONFIG, fp8_params, mode=fp8.W8A8, emulate=True)
    lowered = forward.lower(w8a8, prompts).as_text()
    # The scanned group's 2 layers appear once (scan body) plus the tail layer: 3 x 7 projections.
    assert fp8_dots(lowered) == 21
    weight_only = fp8.from_params(CONFIG, fp8_params, mode=fp8.WEIGHT_ONLY)
    assert fp8_dots(forward.lower(weight_only, prompts).as_text()) == 0
    if quant.native_fp8_dot():
        assert "__cublas$lt$matmul$f8" in forward.lower(w8a8, prompts).compile().as_text()


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory, tiny_tokenizer):
    """A tiny random HF checkpoint (the conftest oracle's weights, the test tokenizer) and its model."""
    model = hf_model(CONFIG, seed=3)
    directory = tmp_path_factory.mktemp("hf") / "tiny"
    model.save_pretrained(directory)
    shutil.copyfile(tiny_tokenizer.model_file, directory / "tokenizer.model")
    return directory, model


@pytest.fixture(scope="module")
def converted(hf_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("orbax")
    src, _ = hf_checkpoint
    return {dtype: ck.convert_hf(src, root / dtype, dtype=dtype, progress=False) for dtype in ("bfloat16", "fp8")}


def projection_bytes(stored: dict, config: gj.GemmaConfig) -> int:
    """Bytes of every projection's arrays (kernel, and scale if FP8) as the checkpoint stores them."""
    linears = [path for path, m in nnx.iter_modules(gj.abstract_model(config)) if isinstance(m, Linear)]
    total = 0
    for path in linears:
        node = stored
        for key in path:
            node = node[key]
        total += sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(node))
    return total


def test_fp8_checkpoint_round_trips_and_halves_projection_bytes(hf_checkpoint, converted):
    src, hf = hf_checkpoint
    stored = {dtype: ck._stored_tree(path) for dtype, path in converted.items()}
    ratio = projection_bytes(stored["fp8"], CONFIG) / projection_bytes(stored["bfloat16"], CONFIG)
    assert ratio <= 0.55, ratio
    assert json.loads((converted["fp8"] / "gemma_jax.json").read_text())["dtype"] == "fp8"

    # Restored exactly as quantize_params makes it from the bf16 weights the converter reads.
    config, tree = ck.load(converted["fp8"])
    _, bf16 = ck.load(converted["bfloat16"])
    expected = fp8.quantize_params(config, bf16)
    assert jax.tree.structure(tree) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(tree), jax.tree.leaves(expected), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))

    # `dtype` casts what is float (embedding, norms); e4m3 kernels and float32 scales keep theirs.
    _, cast = ck.load(converted["fp8"], dtype=jnp.float32)
    attn = cast["groups"]["layers"][0]["attn"]["q"]
    assert (cast["embedder"]["embedding"].dtype, attn["kernel"].dtype, attn["scale"].dtype) == (
        jnp.float32,
        jnp.float8_e4m3fn,
        jnp.float32,
    )

    # load_model: an FP8 checkpoint serves as is; a bf16 one is quantized on load to the same model.
    tokens = np.random.default_rng(5).integers(1, CONFIG.vocab_size, (4, 16)).astype(np.int32)
    forward = nnx.jit(lambda m, t: m(t)[0])
    served = ck.load_model(converted["fp8"], dtype=jnp.float32)
    assert {m.quant for _, m in nnx.iter_modules(served) if isinstance(m, Linear)} == {fp8.WEIGHT_ONLY}
    logits = np.asarray(forward(served, jnp.asarray(tokens)))
    on_load = ck.load_model(converted["bfloat16"], dtype=jnp.float32, quant=fp8.WEIGHT_ONLY)
    np.testing.assert_allclose(np.asarray(forward(on_load, jnp.asarray(tokens))), logits, atol=1e-5, rtol=0)
    top1 = np.mean(logits.argmax(-1) == hf_logits(hf, tokens).argmax(-1))
    assert top1 >= 0.95, top1  # vs the float32 HF model (measured 1.0; bf16 storage + FP8 projections)

    # Restored straight into the shardings of the FP8 model's logical axes.
    mesh = sharding.make_mesh("fsdp=2,tensor=4")
    placed = gj.params_of(ck.load_model(converted["fp8"], mesh=mesh))
    expected_shardings = sharding.param_shardings(fp8.abstract_model(CONFIG), mesh)
    for leaf, want in zip(jax.tree.leaves(placed), jax.tree.leaves(expected_shardings), strict=True):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)

    with pytest.raises(CheckpointError, match="is an FP8 checkpoint; export the bf16"):
        ck.export_hf(converted["fp8"], src.parent / "exported")


def test_save_fp8(converted, tmp_path):
    """`save(dtype="fp8")` quantizes float params like the converter and keeps FP8 params as they are."""
    config, bf16 = ck.load(converted["bfloat16"])
    _, stored = ck.load(converted["fp8"])
    for name, tree in (("from_float", bf16), ("from_fp8", stored)):
        _, again = ck.load(ck.save(tmp_path / name, config, tree, dtype="fp8"))
        for got, want in zip(jax.tree.leaves(again), jax.tree.leaves(stored), strict=True):
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    with pytest.raises(CheckpointError, match="these are FP8 params: save them with dtype='fp8'"):
        ck.save(tmp_path / "bad", config, stored, dtype="bfloat16")
    assert not (tmp_path / "bad").exists()


def test_convert_fp8_refuses_nonfinite_weight_and_writes_nothing(hf_checkpoint, tmp_path):
    src, _ = hf_checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    tensors = safetensors.numpy.load_file(broken / "model.safetensors")
    tensors["model.layers.2.mlp.down_proj.weight"][7, 3] = np.nan
    safetensors.numpy.save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    dst = tmp_path / "fp8"
    with pytest.raises(CheckpointError, match=r"tail\.layers\.0\.mlp\.down\.kernel: 1 of 64 output channels"):
        ck.convert_hf(broken, dst, dtype="fp8", progress=False)
    assert not dst.exists() and not dst.with_name("fp8.incomplete").exists()


def test_sample_cli_fp8_and_w8a8_fallback(hf_checkpoint, tmp_path, monkeypatch, capsys):
    """`--dtype fp8` converts the HF source to an FP8 checkpoint and samples; `--quant w8a8` on CPU warns once."""
    monkeypatch.setattr(sample.sharding, "maybe_initialize_distributed", lambda *a: False)
    src, _ = hf_checkpoint
    argv = ["--checkpoint", str(src), "--cache-dir", str(tmp_path), "--cache-length", "32", "--max-new-tokens", "4"]
    argv += ["--json", "--prompt", "Hello", "--dtype", "fp8", "--quant", "w8a8"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert sample.main(argv) == 0
    assert sum("W8A8 needs a native FP8 matmul" in str(w.message) for w in caught) == 1
    row = json.loads(capsys.readouterr().out)
    assert 1 <= len(row["token_ids"]) <= 4 and row["finish_reason"] in ("stop", "length")
    (converted,) = tmp_path.iterdir()
    assert json.loads((converted / "gemma_jax.json").read_text())["dtype"] == "fp8"
