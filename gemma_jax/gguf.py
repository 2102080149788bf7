"""llama.cpp GGUF files -> what an HF Gemma checkpoint holds: config, float tensors, sentencepiece tokenizer.

llama.cpp's converter renames, re-encodes and reshapes an HF checkpoint; this module undoes each
step, so the rest of the package (`params`, `checkpoint`, `tokenizer`) sees an HF checkpoint:

- tensor names: `blk.{i}.attn_q.weight` -> `model.layers.{i}.self_attn.q_proj.weight`, from the
  `gguf` package's own name table (the one llama.cpp writes with);
- quantized blocks (Q4_K, Q6_K, Q8_0, ...) -> float32 with `gguf.dequantize`; rows stay HF's [out, in];
- Gemma's RMSNorm scales by (1 + w) and llama.cpp stores 1 + w: we subtract 1, as transformers'
  GGUF loader does;
- config: the GGUF metadata keys -> HF config.json keys, plus what llama.cpp hard-codes per
  architecture when the file does not store it (Gemma-3's 5:1 layer pattern and 10k local RoPE
  base, the 27B query scale);
- tokenizer: the vocabulary (pieces, scores, types) -> a sentencepiece BPE ModelProto with byte
  fallback and no dummy prefix, the special ids from the GGUF.

Only the header and metadata are read until a tensor is asked for (the file is memory-mapped), so
every check runs before any dequantization or write.
"""

from __future__ import annotations

import mmap
import os
import pathlib
import struct
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from gemma_jax import checkpoint, params
from gemma_jax.checkpoint_errors import CheckpointError, ShapeMismatchError, SourceError
from gemma_jax.config import GEMMA2, GEMMA3, ConfigError, GemmaConfig

# GGUF `general.architecture` -> HF model_type.
ARCHITECTURES = {"gemma2": GEMMA2, "gemma3": GEMMA3}
# llama.cpp scales queries by 1/sqrt(hidden / heads) for the 27B models (identified by depth),
# by 1/sqrt(head_dim) otherwise; the GGUF does not store it.
_LAYERS_27B = {"gemma2": 46, "gemma3": 62}
# Values llama.cpp assumes when an (older) file lacks the key; the others are required.
_DEFAULTS = {
    "gemma2": {"rope.freq_base": 10_000.0, "attention.sliding_window": 4096},
    "gemma3": {"rope.freq_base": 1_000_000.0},
}
_GEMMA3_PERIOD = 6  # llama.cpp: 5 sliding layers, then 1 global
_GEMMA3_LOCAL_ROPE_THETA = 10_000.0
_SPACE = "\u2581"  # sentencepiece's escaped space
# Storage dtypes `convert_gguf` writes. FP8 / int8: convert to bfloat16, then `load_model(..., storage="fp8")`
# (or `--dtype fp8` / `--dtype int8` in the CLIs) quantizes at load.
DTYPES = ("bfloat16", "float32")


class GGUFError(SourceError):
    """A GGUF file cannot be converted: corrupt, or a model this package does not implement."""


class CorruptGGUFError(GGUFError):
    """Not a readable GGUF file: bad magic, truncated, or inconsistent header."""


class UnsupportedGGUFError(GGUFError):
    """A readable GGUF of an architecture, quant type or option gemma_jax does not implement."""


def open_gguf(path: str | os.PathLike) -> Any:
    """A `gguf.GGUFReader` over `path` (memory-mapped), after the header and tensor table check out."""
    import gguf  # optional dependency: the `demo` extra

    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise GGUFError(f"no GGUF file at {path}")
    _check_header_lengths(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader fails with ValueError/IndexError/KeyError deep in numpy
        raise CorruptGGUFError(
            f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it is truncated or corrupt: "
            "download or assemble it again"
        ) from e
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise CorruptGGUFError(f"{path}: tensor {t.name!r} runs past the end of the file; it is truncated")
    return reader


def _check_header_lengths(path: pathlib.Path) -> None:
    """Walk the header and refuse any string, array or dimension list longer than the bytes left in the file.

    `gguf.GGUFReader` builds one Python object per array element before checking anything, so a
    53-byte file declaring 2^34 elements would take tens of GB; this walk reads only lengths.
    A file without the GGUF magic is left to the reader, which names that problem.
    """
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF" or path.stat().st_size < _HEADER_BYTES:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            walk = _HeaderWalk(data, path)
            walk.pos = 4
            if walk.number("I", "version") & 0xFFFF == 0:  # written on a big-endian machine
                walk.order = ">"
            tensors, kvs = walk.number("Q", "tensor count"), walk.number("Q", "metadata count")
            for _ in range(kvs):
                key = f"metadata {walk.string('metadata key')!r}"
                walk.value(walk.number("I", key), key)
            for _ in range(tensors):
                name = walk.string("tensor name")
                walk.take(8 * walk.number("I", name), f"dimensions of tensor {name!r}")
                walk.take(12, f"type and offset of tensor {name!r}")


_HEADER_BYTES = 24  # magic, version, tensor count, metadata count
_MAX_NESTING = 8  # arrays of arrays: llama.cpp writes none deeper than 2


class _HeaderWalk:
    """A cursor over a GGUF header that checks each declared length against the bytes left."""

    def __init__(self, data: mmap.mmap, path: pathlib.Path):
        import gguf

        t = gguf.GGUFValueType
        self.string_type, self.array_type = t.STRING, t.ARRAY
        self.sizes = {t.UINT8: 1, t.INT8: 1, t.BOOL: 1, t.UINT16: 2, t.INT16: 2, t.UINT32: 4, t.INT32: 4}
        self.sizes |= {t.FLOAT32: 4, t.UINT64: 8, t.INT64: 8, t.FLOAT64: 8}
        self.data, self.path, self.pos, self.order = data, path, 0, "<"

    def need(self, nbytes: int, what: str) -> None:
        left = len(self.data) - self.pos
        if nbytes > left:
            raise CorruptGGUFError(
                f"{self.path}: {what} at byte {self.pos} needs {nbytes} bytes but the file has {left} left; "
                "it is truncated, corrupt or crafted"
            )

    def take(self, nbytes: int, what: str) -> int:
        """The offset of the next `nbytes` bytes, which must lie inside the file."""
        self.need(nbytes, what)
        self.pos += nbytes
        return self.pos - nbytes

    def number(self, fmt: str, what: str) -> int:
        return struct.unpack_from(self.order + fmt, self.data, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        start = self.take(self.number("Q", what), what)
        return bytes(self.data[start : self.pos]).decode("utf-8", "replace")

    def value(self, kind: int, what: str, depth: int = 0) -> None:
        if kind in self.sizes:
            self.take(self.sizes[kind], what)
        elif kind == self.string_type:
            self.string(what)
        elif kind == self.array_type:
            if depth == _MAX_NESTING:
                raise CorruptGGUFError(f"{self.path}: {what} nests arrays deeper than {_MAX_NESTING}; it is crafted")
            item, count = self.number("I", what), self.number("Q", what)
            if item in self.sizes:
                self.take(count * self.sizes[item], f"{what} ({count} elements)")
                return
            self.need(count * 8, f"{what} ({count} elements)")  # a string or an array takes 8 bytes at least
            for _ in range(count):
                self.value(item, what, depth + 1)
        else:
            raise CorruptGGUFError(f"{self.path}: {what} has value type {kind}, which GGUF does not define")


def architecture(reader: Any) -> str:
    """The GGUF architecture name, checked to be one we convert."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedGGUFError(
            f"GGUF architecture {arch!r} is not supported; gemma_jax converts {sorted(ARCHITECTURES)}"
        )
    return arch


def hf_config(reader: Any) -> dict[str, Any]:
    """The HF config.json dict this GGUF describes (model_type gemma2 or gemma3_text)."""
    arch = architecture(reader)

    def key(name: str, default: Any = ...) -> Any:
        return _field(reader, f"{arch}.{name}", _DEFAULTS[arch].get(name, default))

    hidden, heads, layers = key("embedding_length"), key("attention.head_count"), key("block_count")
    if not isinstance(heads, int) or heads <= 0:  # before it divides the hidden size
        raise CorruptGGUFError(f"GGUF metadata {arch}.attention.head_count is {heads!r}, not a positive integer")
    head_dim = key("attention.key_length", hidden // heads)
    hf: dict[str, Any] = {
        "model_type": ARCHITECTURES[arch],
        "vocab_size": key("vocab_size", None) or len(_field(reader, "tokenizer.ggml.tokens")),
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "query_pre_attn_scalar": hidden // heads if layers == _LAYERS_27B[arch] else head_dim,
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": key("context_length"),
        "sliding_window": key("attention.sliding_window"),
        "rope_theta": key("rope.freq_base"),
        "tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors),
    }
    if arch == "gemma2":
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            if (value := key(name, None)) is not None:
                hf[name] = value
    else:
        # Newer llama.cpp files may store the pattern (a period, or per layer: true = sliding) and local base.
        pattern = key("attention.sliding_window_pattern", _GEMMA3_PERIOD)
        if isinstance(pattern, list):
            hf["layer_types"] = ["sliding_attention" if s else "full_attention" for s in pattern]
        else:
            hf["sliding_window_pattern"] = pattern
        hf["rope_local_base_freq"] = key("rope.freq_base_swa", _GEMMA3_LOCAL_ROPE_THETA)
        scaling = key("rope.scaling.type", "none")
        if scaling == "linear":
            hf["rope_scaling"] = {"rope_type": "linear", "factor": key("rope.scaling.factor")}
        elif scaling != "none":
            raise UnsupportedGGUFError(f"RoPE scaling {scaling!r} is not supported; gemma_jax implements 'linear'")
    return hf


def read_config(reader: Any) -> GemmaConfig:
    try:
        return GemmaConfig.from_hf(hf_config(reader))
    except ConfigError as e:
        raise UnsupportedGGUFError(f"the GGUF's model cannot be represented: {e}") from e


def hf_names(reader: Any, config: GemmaConfig) -> dict[str, str]:
    """GGUF tensor name -> HF tensor name, for every tensor the config needs."""
    import gguf

    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[architecture(reader)]
    table = gguf.get_tensor_name_map(arch, config.num_layers)
    out = {}
    for hf_name in params.hf_names(config):
        base, suffix = hf_name.rsplit(".", 1)
        out[f"{table.get_name(base)}.{suffix}"] = hf_name
    return out


def check_tensors(reader: Any, config: GemmaConfig) -> dict[str, Any]:
    """HF name -> GGUF tensor, after checking names, shapes and that every quant type can be dequantized."""
    import gguf

    names = hf_names(reader, config)
    by_name = {t.name: t for t in reader.tensors}
    unexpected = sorted(set(by_name) - set(names))
    missing = sorted(set(names) - set(by_name))
    if unexpected or missing:
        raise UnsupportedGGUFError(
            f"GGUF tensors do not match a {config.num_layers}-layer {config.model_type} model: "
            f"missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    tensors = {names[n]: t for n, t in by_name.items()}
    for hf_name, t in tensors.items():
        try:
            params.check_shape(hf_name, hf_shape(t), config)
        except params.ParamMappingError as e:
            raise ShapeMismatchError(f"{e} (GGUF tensor {t.name!r})") from None
    first_of_type = {t.tensor_type: t for t in reversed(reader.tensors)}
    for qtype, t in first_of_type.items():
        try:
            gguf.dequantize(t.data[:1], qtype)  # one row: cheap, and it raises for types gguf cannot decode
        except NotImplementedError:
            raise UnsupportedGGUFError(
                f"GGUF quant type {qtype.name} (tensor {t.name!r}) is not supported: the gguf package "
                "cannot dequantize it; use a file quantized to a common type (e.g. Q4_K_M, Q8_0, F16)"
            ) from None
    return tensors


def hf_shape(tensor: Any) -> tuple[int, ...]:
    """A GGUF tensor's shape in HF's (row-major) order: GGUF lists dimensions innermost first."""
    return tuple(int(d) for d in reversed(tensor.shape))


def dequantize(tensor: Any) -> np.ndarray:
    """One GGUF tensor as float32 in HF layout, llama.cpp's +1 on norm scales undone."""
    import gguf

    w = gguf.dequantize(tensor.data, tensor.tensor_type).reshape(hf_shape(tensor))
    return w - np.float32(1.0) if tensor.name.endswith("norm.weight") else w


def iter_state_dict(tensors: Mapping[str, Any], dtype: Any = np.float32) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array in `dtype`) pairs, dequantized one tensor at a time."""
    for hf_name, t in tensors.items():
        yield hf_name, dequantize(t).astype(dtype, copy=False)


def load_state_dict(path: str | os.PathLike) -> tuple[GemmaConfig, dict[str, np.ndarray]]:
    """(config, float32 HF state dict) of a GGUF file, all in memory (4 bytes per parameter)."""
    reader = open_gguf(path)
    config = read_config(reader)
    return config, dict(iter_state_dict(check_tensors(reader, config)))


# ---- tokenizer


def tokenizer_proto(reader: Any) -> bytes:
    """The GGUF vocabulary as a serialized sentencepiece ModelProto (Gemma: BPE, byte fallback, no dummy prefix).

    Undone from llama.cpp: it spells user-defined whitespace pieces with real spaces (we escape them
    back to U+2581) and marks the unknown piece as control (sentencepiece needs it UNKNOWN).
    """
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    if (kind := _field(reader, "tokenizer.ggml.model")) != "llama":
        raise UnsupportedGGUFError(f"GGUF tokenizer {kind!r} is not supported; Gemma files use 'llama' (sentencepiece)")
    pieces = [p.replace(" ", _SPACE) for p in _field(reader, "tokenizer.ggml.tokens")]
    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    if not len(pieces) == len(scores) == len(types) or len(set(pieces)) != len(pieces):
        raise CorruptGGUFError("GGUF vocabulary is inconsistent: tokens, scores and types differ in length or repeat")
    special = {
        name: _field(reader, f"tokenizer.ggml.{key}_token_id", default)
        for name, key, default in (("unk", "unknown", 3), ("bos", "bos", 2), ("eos", "eos", 1), ("pad", "padding", 0))
    }
    model = sp_pb2.ModelProto()
    trainer = model.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(pieces)
    trainer.byte_fallback = True
    for name, index in special.items():
        setattr(trainer, f"{name}_id", index)
        setattr(trainer, f"{name}_piece", pieces[index])
    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", False))
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    unknown = sp_pb2.ModelProto.SentencePiece.UNKNOWN
    for i, (piece, score, kind) in enumerate(zip(pieces, scores, types, strict=True)):
        # GGUF token types use sentencepiece's numbering (1 normal ... 6 byte).
        model.pieces.add(piece=piece, score=score, type=unknown if i == special["unk"] else int(kind))
    return model.SerializeToString()


def generation_config(reader: Any) -> dict[str, Any]:
    """generation_config.json: stop at <eos> and, when the vocabulary has it, <end_of_turn> (as the HF files do)."""
    tokens = _field(reader, "tokenizer.ggml.tokens")
    eos = _field(reader, "tokenizer.ggml.eos_token_id", 1)
    stops = [eos] + [i for i, t in enumerate(tokens) if t == "<end_of_turn>" and i != eos]
    return {
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id", 2),
        "eos_token_id": stops,
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id", 0),
    }


def write_tokenizer(reader: Any, directory: pathlib.Path) -> None:
    """tokenizer.model and generation_config.json into `directory` (the files `Tokenizer.from_dir` reads), and
    tokenizer_config.json with the chat template when the file has one (an instruction-tuned model's GGUF does)."""
    import json

    (directory / "tokenizer.model").write_bytes(tokenizer_proto(reader))
    (directory / "generation_config.json").write_text(json.dumps(generation_config(reader), indent=2) + "\n")
    if template := _field(reader, "tokenizer.chat_template", None):
        (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}, indent=2) + "\n")


# ---- conversion


def convert_gguf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    progress: bool = True,
    source: str | None = None,
) -> pathlib.Path:
    """GGUF file -> gemma_jax checkpoint at `dst` (atomic), dequantized to `dtype`, tokenizer rebuilt.

    `source` is recorded in the checkpoint's metadata (default: "gguf:" and the file's path).

    Every check (destination, architecture, tensors, quant types) runs before dequantizing. The
    dequantized model is assembled in memory in `dtype`: peak memory is about twice the output's size.
    """
    from tqdm.auto import tqdm

    if dtype not in DTYPES:
        raise CheckpointError(
            f"dtype {dtype!r} is not supported for GGUF conversion; choose one of {list(DTYPES)} "
            "(for FP8, convert to bfloat16 and load with quant='weight_only' / --dtype fp8)"
        )
    dst = checkpoint.check_destination(dst, overwrite, sources=[src])
    reader = open_gguf(src)
    config = read_config(reader)
    tensors = check_tensors(reader, config)
    items = tqdm(
        iter_state_dict(tensors, checkpoint.DTYPES[dtype]), total=len(tensors), desc="dequantize", disable=not progress
    )
    tree = params.from_hf_state_dict(dict(items), config)
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        write_tokenizer(reader, pathlib.Path(tokenizer_dir))
        source = source or f"gguf:{pathlib.Path(src).expanduser().absolute()}"
        return checkpoint.save(
            dst, config, tree, dtype=dtype, tokenizer_dir=tokenizer_dir, source=source, overwrite=overwrite
        )


def _field(reader: Any, name: str, default: Any = ...) -> Any:
    """A metadata value (scalars as Python values, arrays as lists); `default` when absent, else an error."""
    field = reader.fields.get(name)
    if field is None:
        if default is ...:
            raise CorruptGGUFError(f"GGUF metadata has no {name!r}; the file is incomplete or not a Gemma model")
        return default
    import gguf

    value = field.contents()
    if field.types == [gguf.GGUFValueType.FLOAT32]:  # the float32's shortest decimal: 1e-06, not 9.99999997e-07
        return float(str(np.float32(value)))
    return value
