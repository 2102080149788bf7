"""HF safetensors <-> Orbax conversion: logits vs transformers, bit-exact round trips, sharded restore,
hub ids, atomicity under SIGKILL, and a named error for each bad input."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import huggingface_hub
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from conftest import hf_logits, hf_model
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gemma_jax as gj
from gemma_jax import checkpoint as ck
from gemma_jax import checkpoint_errors as errors

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = {"single": gj.gemma2_tiny(), "sharded": gj.gemma2_tiny(num_layers=5)}  # 5 layers: a tail layer too


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, tiny_tokenizer):
    """Tiny random HF checkpoints: one model.safetensors (with tokenizer files), one sharded with an index."""
    root = tmp_path_factory.mktemp("hf")
    models, dirs = {}, {}
    for seed, (kind, config) in enumerate(CONFIGS.items()):
        models[kind] = hf_model(config, seed)
        dirs[kind] = root / kind
        models[kind].save_pretrained(dirs[kind], max_shard_size="100KB" if kind == "sharded" else "5GB")
    shutil.copyfile(tiny_tokenizer.model_file, dirs["single"] / "tokenizer.model")
    (dirs["single"] / "tokenizer_config.json").write_text('{"add_bos_token": true}')
    return dirs, models


@pytest.fixture(scope="module")
def converted(hf_dirs, tmp_path_factory):
    dirs, _ = hf_dirs
    root = tmp_path_factory.mktemp("orbax")
    return {kind: ck.convert_hf(d, root / kind, dtype="float32", progress=False) for kind, d in dirs.items()}


def tokens_for(config: gj.GemmaConfig) -> np.ndarray:
    return np.random.default_rng(0).integers(1, config.vocab_size, (2, 11)).astype(np.int32)


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_converted_logits_match_transformers(hf_dirs, converted, kind):
    dirs, models = hf_dirs
    assert (dirs[kind] / "model.safetensors.index.json").exists() == (kind == "sharded")
    config, params = ck.load(converted[kind])
    assert config == CONFIGS[kind]
    tokens = tokens_for(config)
    logits, _ = gj.from_params(config, params)(jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(logits), hf_logits(models[kind], tokens), atol=1e-5, rtol=0)


def test_checkpoint_layout_and_metadata(hf_dirs, converted, tiny_tokenizer):
    dirs, _ = hf_dirs
    dst = converted["single"]
    assert ck.is_checkpoint(dst)
    assert not dst.with_name(dst.name + ".incomplete").exists()
    meta = json.loads((dst / "gemma_jax.json").read_text())
    assert meta["source"] == str(dirs["single"].resolve())
    assert (meta["dtype"], meta["revision"], meta["gemma_jax_version"]) == ("float32", None, gj.__version__)
    assert json.loads((dst / "config.json").read_text()) == CONFIGS["single"].to_hf()
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        assert (dst / name).read_bytes() == (dirs["single"] / name).read_bytes()
    assert not (dst / "special_tokens_map.json").exists()  # absent in the source, so not invented
    from gemma_jax.tokenizer import Tokenizer

    assert Tokenizer.from_dir(dst).encode("Hello world") == tiny_tokenizer.encode("Hello world")


def test_load_casts_and_load_model(converted):
    _, f32 = ck.load(converted["single"])
    _, bf16 = ck.load(converted["single"], dtype="bfloat16")
    emb = bf16["embedder"]["embedding"]
    assert emb.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(emb), np.asarray(f32["embedder"]["embedding"]).astype(ml_dtypes.bfloat16))
    model = ck.load_model(converted["single"])  # computes in bfloat16, params as stored (float32)
    assert model.dtype == jnp.bfloat16
    assert gj.params_of(model)["final_norm"]["scale"].dtype == jnp.float32


def test_sharded_restore_reads_each_shard_onto_its_device(converted):
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("x",))
    _, reference = ck.load(converted["sharded"])

    def sharding(a):  # split the first axis divisible by 8, replicate the rest
        axis = next((i for i, n in enumerate(a.shape) if n % 8 == 0), None)
        spec = [None] * a.ndim
        if axis is not None:
            spec[axis] = "x"
        return NamedSharding(mesh, P(*spec))

    shardings = jax.tree.map(sharding, reference)
    _, params = ck.load(converted["sharded"], dtype=jnp.bfloat16, shardings=shardings)
    emb = params["embedder"]["embedding"]  # [V, D] = [512, 64]
    assert emb.sharding == shardings["embedder"]["embedding"]
    assert [s.data.shape for s in emb.addressable_shards] == [(64, 64)] * 8
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want).astype(ml_dtypes.bfloat16))
    with pytest.raises(errors.CheckpointError, match="shardings do not match"):
        ck.load(converted["sharded"], shardings={"embedder": shardings["embedder"]})


def hf_tensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out |= safetensors.numpy.load_file(f)
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_hf_orbax_hf_is_bit_exact(hf_dirs, tmp_path, dtype):
    import torch
    import transformers

    dirs, models = hf_dirs
    src = dirs["sharded"]
    if dtype == "bfloat16":
        src = tmp_path / "hf_bf16"
        hf_model(CONFIGS["sharded"], 1).to(torch.bfloat16).save_pretrained(src)
    ck.convert_hf(src, tmp_path / "orbax", dtype=dtype, progress=False)
    out = ck.export_hf(tmp_path / "orbax", tmp_path / "hf", max_shard_size="200KB", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert all(s.stat().st_size <= 200_000 + 10_000 for s in shards)  # + the header
    before, after = hf_tensors(src), hf_tensors(out)
    assert after.keys() == before.keys()
    for name, w in before.items():
        assert after[name].dtype == w.dtype == np.dtype(dtype), name
        np.testing.assert_array_equal(after[name].view(np.uint8), w.view(np.uint8), err_msg=name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float()
    tokens = tokens_for(CONFIGS["sharded"])
    if dtype == "float32":
        np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(models["sharded"], tokens))


def test_hub_id_downloads_only_needed_files(hf_dirs, tmp_path, monkeypatch):
    dirs, _ = hf_dirs
    calls = []

    def fake_download(repo_id, *, revision, allow_patterns):
        calls.append((repo_id, revision, allow_patterns))
        return str(dirs["single"])  # what snapshot_download returns: a local snapshot directory

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    dst = ck.convert_hf("owner/gemma-tiny", tmp_path / "ckpt", dtype="float32", revision="v1", progress=False)
    ((repo_id, revision, patterns),) = calls
    assert (repo_id, revision) == ("owner/gemma-tiny", "v1")
    assert {"config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.model"} <= set(patterns)
    assert {"tokenizer_config.json", "chat_template.jinja"} <= set(patterns)  # where a chat template lives
    assert not any(p.endswith((".bin", ".gguf", ".pt")) for p in patterns)
    meta = json.loads((dst / "gemma_jax.json").read_text())
    assert (meta["source"], meta["revision"], meta["commit"]) == ("owner/gemma-tiny", "v1", "single")
    np.testing.assert_array_equal(
        ck.load(dst)[1]["final_norm"]["scale"], hf_tensors(dirs["single"])["model.norm.weight"]
    )
    snapshot = shutil.copytree(dirs["single"], dst / "snapshot")  # an HF cache inside the destination
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *args, **kwargs: str(snapshot))
    with pytest.raises(errors.OverwriteRefusedError, match="holds the source"):
        ck.convert_hf("owner/gemma-tiny", dst, overwrite=True, progress=False)
    assert (snapshot / "model.safetensors").is_file() and ck.is_checkpoint(dst)


def test_hub_id_offline_says_to_pass_a_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(errors.HubDownloadError, match="pass its local directory"):
        ck.convert_hf("gemma-jax-tests/not-cached", tmp_path / "ckpt", progress=False)
    assert not (tmp_path / "ckpt").exists()


# ---- bad inputs: each a named error, DST absent


def _rewrite(directory: pathlib.Path, edit) -> None:
    path = directory / "model.safetensors"
    tensors = safetensors.numpy.load_file(path)
    edit(tensors)
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


def _truncate(directory: pathlib.Path) -> None:
    path = directory / "model.safetensors"
    os.truncate(path, path.stat().st_size - 100)


def _set_model_type(directory: pathlib.Path) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))


BAD_INPUTS = {
    "missing": (
        lambda d: _rewrite(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
        errors.MissingTensorError,
        r"missing tensors \[model\.layers\.1\.mlp\.up_proj\.weight\]",
    ),
    "unexpected": (
        lambda d: _rewrite(d, lambda t: t.update({"model.layers.0.mlp.bias": np.zeros(3, np.float32)})),
        errors.UnexpectedTensorError,
        r"unexpected tensors \[model\.layers\.0\.mlp\.bias\]",
    ),
    "shape": (
        lambda d: _rewrite(d, lambda t: t.update({"model.norm.weight": np.zeros(3, np.float32)})),
        errors.ShapeMismatchError,
        r"shape mismatch for 'model\.norm\.weight': expected \(64,\) from config\.json, found \(3,\)",
    ),
    "model_type": (_set_model_type, errors.UnsupportedModelError, r"model_type 'llama'"),
    "truncated": (_truncate, errors.CorruptSafetensorsError, r"model\.safetensors: .*truncated or corrupt"),
    "corrupt": (
        lambda d: (d / "model.safetensors").write_bytes(b"\x20\0\0\0\0\0\0\0{not json at all, just noise}"),
        errors.CorruptSafetensorsError,
        r"truncated or corrupt",
    ),
    "no_config": (lambda d: (d / "config.json").unlink(), errors.MissingConfigError, r"no config\.json in"),
    "no_weights": (lambda d: (d / "model.safetensors").unlink(), errors.SourceError, r"only safetensors"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_named_and_leaves_no_destination(hf_dirs, tmp_path, case):
    edit, error, message = BAD_INPUTS[case]
    src = shutil.copytree(hf_dirs[0]["single"], tmp_path / "src")
    edit(src)
    dst = tmp_path / "dst"
    with pytest.raises(error, match=message):
        ck.convert_hf(src, dst, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_missing_shard_named_by_index(hf_dirs, tmp_path):
    src = shutil.copytree(hf_dirs[0]["sharded"], tmp_path / "src")
    lost = sorted(src.glob("model-*.safetensors"))[1]
    lost.unlink()
    with pytest.raises(errors.CorruptSafetensorsError, match=rf"missing: \['{lost.name}'\]"):
        ck.convert_hf(src, tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst").exists()


def test_existing_destination_needs_overwrite(hf_dirs, converted, tmp_path):
    src = hf_dirs[0]["single"]
    dst = shutil.copytree(converted["sharded"], tmp_path / "dst")
    with pytest.raises(errors.DestinationExistsError, match="--overwrite"):
        ck.convert_hf(src, dst, progress=False)
    with pytest.raises(errors.DestinationExistsError):
        ck.export_hf(converted["single"], dst, progress=False)
    assert ck.load(dst)[0] == CONFIGS["sharded"]
    ck.convert_hf(src, dst, dtype="float32", overwrite=True, progress=False)
    assert ck.load(dst)[0] == CONFIGS["single"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def _tree(root: pathlib.Path) -> dict[str, int]:
    """Every path under `root` with its size: equal before and after means nothing was touched."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))}


def test_overwrite_replaces_only_an_output_of_the_same_kind(hf_dirs, converted, tmp_path):
    src, ckpt_src = hf_dirs[0]["single"], converted["single"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("precious")
    (tmp_path / "file.txt").write_text("precious")
    ckpt = shutil.copytree(converted["sharded"], tmp_path / "ckpt")
    export = ck.export_hf(ckpt_src, tmp_path / "export", progress=False)
    hf = shutil.copytree(src, tmp_path / "hf")
    assert ck.is_hf_export(export) and not ck.is_hf_export(hf) and not ck.is_hf_export(ckpt)
    staged = shutil.copytree(src, tmp_path / "new.incomplete")  # the staging path a write to `new` clears
    before = _tree(tmp_path)
    with pytest.raises(errors.OverwriteRefusedError, match=r"new\.incomplete is the source"):
        ck.convert_hf(staged, tmp_path / "new", progress=False)
    for dst in (foreign, tmp_path / "file.txt", export):
        with pytest.raises(errors.OverwriteRefusedError, match=f"{dst}: it is not a complete gemma_jax checkpoint"):
            ck.convert_hf(src, dst, overwrite=True, progress=False)
    for dst in (foreign, tmp_path / "file.txt", ckpt, hf):
        with pytest.raises(errors.OverwriteRefusedError, match="not a complete HF export written by gemma_jax"):
            ck.export_hf(ckpt_src, dst, overwrite=True, progress=False)
    assert _tree(tmp_path) == before
    ck.convert_hf(src, ckpt, dtype="float32", overwrite=True, progress=False)
    ck.export_hf(ckpt_src, export, dtype="bfloat16", overwrite=True, progress=False)
    assert ck.load(ckpt)[0] == CONFIGS["single"]
    assert hf_tensors(export)["model.norm.weight"].dtype == ml_dtypes.bfloat16 and ck.is_hf_export(export)


def _overlapping(kind: str, src: pathlib.Path, made: pathlib.Path, root: pathlib.Path) -> tuple[pathlib.Path, ...]:
    """(source, destination) where the destination is the source, holds it or lies inside it, and is
    otherwise an output `--overwrite` may replace (`made`, a copy of one), so only the overlap stops it."""
    if kind == "same":
        return (shutil.copytree(made, root / "x"),) * 2
    if kind == "parent":
        dst = shutil.copytree(made, root / "dst")
        return shutil.copytree(src, dst / "src"), dst
    inside = shutil.copytree(src, root / "src")
    return inside, shutil.copytree(made, inside / "dst")


@pytest.mark.parametrize(("kind", "relation"), [("same", "is"), ("parent", "holds"), ("child", "lies inside")])
def test_overwrite_never_touches_the_source(hf_dirs, converted, tmp_path, capsys, kind, relation):
    hf_to_orbax, orbax_to_hf = _clis()
    export = ck.export_hf(converted["single"], tmp_path / "made" / "export", progress=False)
    cases = {
        "hf": (hf_to_orbax, hf_dirs[0]["single"], converted["single"]),
        "export": (orbax_to_hf, converted["single"], export),
    }
    for name, (cli, src, made) in cases.items():
        made = src if kind == "same" else made  # "same": the source itself is the destination
        root = tmp_path / name
        src, dst = _overlapping(kind, src, made, root)
        before = _tree(root)
        assert cli.main([str(src), str(dst), "--overwrite"]) == 1
        err = capsys.readouterr().err
        assert f"error: refusing to write {dst}: {dst} {relation} the source {src.resolve()}" in err, err
        assert "Traceback" not in err and _tree(root) == before


def test_unwritable_destination_is_named_before_any_work(hf_dirs, converted, tmp_path, capsys, monkeypatch):
    hf_to_orbax, orbax_to_hf = _clis()
    (tmp_path / "file.txt").write_text("not a directory")
    under_file = tmp_path / "file.txt" / "out"
    assert hf_to_orbax.main([str(hf_dirs[0]["single"]), str(under_file)]) == 1
    assert f"error: cannot create {under_file}: {tmp_path / 'file.txt'} is a file" in capsys.readouterr().err
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = os.access  # root ignores chmod: the read-only directory is os.access saying so
    monkeypatch.setattr(os, "access", lambda p, mode: pathlib.Path(p) != read_only and real_access(p, mode))
    assert orbax_to_hf.main([str(converted["single"]), str(read_only / "hf" / "out")]) == 1
    err = capsys.readouterr().err
    assert f"error: cannot create {read_only / 'hf' / 'out'}: {read_only} is not writable" in err
    assert "Traceback" not in err and list(read_only.iterdir()) == []


def test_write_failure_midway_is_named_and_leaves_nothing(hf_dirs, tmp_path, monkeypatch):
    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "_copy_tokenizer", disk_full)
    with pytest.raises(errors.CheckpointError, match=r"could not write .*/dst: \[Errno 28\] No space left"):
        ck.convert_hf(hf_dirs[0]["single"], tmp_path / "dst", progress=False)
    assert list(tmp_path.iterdir()) == []


CONFIG_ERRORS = {
    "layer_types": ({"num_hidden_layers": 3}, r"layer_types has 4 entries but num_hidden_layers is 3"),
    "heads": ({"num_attention_heads": 0}, r"num_attention_heads must be a positive integer, got 0"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_invalid_config_is_named_without_a_traceback(hf_dirs, tmp_path, capsys, case):
    edit, message = CONFIG_ERRORS[case]
    src = shutil.copytree(hf_dirs[0]["single"], tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(config | edit))
    hf_to_orbax, _ = _clis()
    assert hf_to_orbax.main([str(src), str(tmp_path / "dst")]) == 1
    err = capsys.readouterr().err
    assert re.search(rf"error: {src / 'config.json'}: {message}; fix config.json", err), err
    assert "Traceback" not in err and not (tmp_path / "dst").exists()


def test_load_refuses_what_is_not_a_checkpoint(converted, tmp_path):
    with pytest.raises(errors.NotACheckpointError, match="no checkpoint at"):
        ck.load(tmp_path / "nothing")
    partial = shutil.copytree(converted["single"], tmp_path / "partial")
    (partial / "gemma_jax.json").unlink()
    with pytest.raises(errors.NotACheckpointError, match="not a complete gemma_jax checkpoint"):
        ck.load(partial)
    with pytest.raises(errors.NotACheckpointError):
        ck.export_hf(partial, tmp_path / "hf", progress=False)


_KILL_SCRIPT = """
import sys, time
sys.argv[1:] = {argv!r}
sys.path.insert(0, {convert!r})
from orbax.checkpoint import v1 as ocp
import hf_to_orbax

saves = 0
real_save = ocp.partial.save
def save_then_stall(*args, **kwargs):  # stall after a few parameters are written
    global saves
    real_save(*args, **kwargs)
    saves += 1
    if saves == 3:
        print("MIDWAY", flush=True)
        time.sleep(600)
ocp.partial.save = save_then_stall
sys.exit(hf_to_orbax.main())
"""


def test_sigkill_midway_leaves_no_checkpoint_and_rerun_succeeds(hf_dirs, converted, tmp_path):
    src, dst = hf_dirs[0]["sharded"], tmp_path / "dst"
    script = _KILL_SCRIPT.format(argv=[str(src), str(dst), "--dtype", "float32"], convert=str(REPO / "convert"))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "MIDWAY"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    leftover = tmp_path / "dst.incomplete"
    assert leftover.is_dir() and not dst.exists()
    for path in (dst, leftover):
        assert not ck.is_checkpoint(path)
        with pytest.raises(errors.NotACheckpointError):
            ck.load(path)
    ck.convert_hf(src, dst, dtype="float32", progress=False)
    assert ck.is_checkpoint(dst) and not leftover.exists()
    for got, want in zip(jax.tree.leaves(ck.load(dst)), jax.tree.leaves(ck.load(converted["sharded"])), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _clis():
    sys.path.insert(0, str(REPO / "convert"))
    try:
        import hf_to_orbax
        import orbax_to_hf
    finally:
        sys.path.remove(str(REPO / "convert"))
    return hf_to_orbax, orbax_to_hf


def test_cli_round_trip_and_error_exit(hf_dirs, tmp_path, capsys):
    hf_to_orbax, orbax_to_hf = _clis()
    src = hf_dirs[0]["single"]
    assert hf_to_orbax.main([str(src), str(tmp_path / "ckpt"), "--dtype", "float32"]) == 0
    assert "converted 46 tensors" in capsys.readouterr().err
    assert orbax_to_hf.main([str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0
    assert "exported 46 tensors" in capsys.readouterr().err
    assert hf_tensors(tmp_path / "hf")["model.norm.weight"].dtype == ml_dtypes.bfloat16
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    modes = {f.name: oct(f.stat().st_mode) for f in (tmp_path / "hf").iterdir()}
    assert len(set(modes.values())) == 1, modes  # shards as readable as config.json and the tokenizer files
    assert hf_to_orbax.main([str(src), str(tmp_path / "ckpt")]) == 1
    assert "exists; pass overwrite=True (--overwrite)" in capsys.readouterr().err


def test_resolve_converts_once_into_the_cache(hf_dirs, converted, tmp_path, monkeypatch):
    src = hf_dirs[0]["single"]
    assert ck.resolve(str(converted["single"])) == converted["single"]
    monkeypatch.setenv("GEMMA_JAX_CACHE", str(tmp_path / "cache"))
    first = ck.resolve(str(src), dtype="float32")
    assert first.parent == tmp_path / "cache" and ck.is_checkpoint(first)
    monkeypatch.setattr(ck, "convert_hf", lambda *a, **k: pytest.fail("converted twice"))
    assert ck.resolve(str(src), dtype="float32") == first
