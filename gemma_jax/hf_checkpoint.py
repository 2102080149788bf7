"""The HF side of conversion: find a safetensors checkpoint (directory or hub id), check it, stream it, write one.

Tensors are read one at a time: each read maps the file only while that tensor is copied out, so
memory stays at one tensor whatever the checkpoint size. Checks read file headers only, so a bad
checkpoint is refused before anything is written. Written checkpoints follow HF's layout: shards
of bounded size plus `model.safetensors.index.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
import re
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import huggingface_hub
import ml_dtypes
import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

from gemma_jax.checkpoint_errors import (
    CorruptSafetensorsError,
    HubDownloadError,
    InvalidConfigError,
    MissingConfigError,
    SourceError,
    UnsupportedModelError,
)
from gemma_jax.config import SUPPORTED_MODEL_TYPES, ConfigError, GemmaConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Copied verbatim between checkpoints when present.
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",  # newer HF checkpoints keep the chat template here, not in tokenizer_config.json
    "chat_template.json",
)
# What a hub download fetches: config, tokenizer and safetensors weights (not .bin / .gguf copies).
HUB_PATTERNS = ("config.json", *TOKENIZER_FILES, "*.safetensors", INDEX_FILE)
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, read from its file's header."""

    file: pathlib.Path
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class Source:
    """A local HF checkpoint directory and where it came from (for the converted checkpoint's metadata)."""

    directory: pathlib.Path
    source: str  # hub id or absolute path
    revision: str | None  # as asked for
    commit: str | None  # resolved hub commit (the snapshot's name)


def fetch(source: str, revision: str | None = None) -> Source:
    """A local directory as is, or a hub repo id downloaded (config, tokenizer, safetensors only) to the HF cache.

    The download honours the usual HF conventions (HF_TOKEN / `huggingface-cli login`, HF_HOME,
    HF_HUB_OFFLINE); files already in the cache are not fetched again.
    """
    path = pathlib.Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"{source!r} is a file; pass the checkpoint directory that holds config.json")
        if revision is not None:
            raise SourceError(f"revision {revision!r} applies to hub ids only; {source!r} is a local directory")
        return Source(path, str(path.resolve()), None, None)
    if not _HUB_ID.fullmatch(source):
        raise SourceError(f"{source!r} is neither a directory nor a Hugging Face Hub repo id like 'owner/name'")
    try:
        local = huggingface_hub.snapshot_download(source, revision=revision, allow_patterns=list(HUB_PATTERNS))
    except (huggingface_hub.errors.HfHubHTTPError, OSError) as e:
        raise HubDownloadError(
            f"could not download {source!r} (revision {revision or 'main'}) from the Hugging Face Hub: "
            f"{type(e).__name__}: {e}\nIf this machine is offline or cannot reach the hub, download the "
            "checkpoint elsewhere and pass its local directory instead; for gated repos, log in "
            "(`huggingface-cli login` or HF_TOKEN)."
        ) from e
    local = pathlib.Path(local)
    return Source(local, source, revision, local.name)


def read_config(directory: pathlib.Path) -> GemmaConfig:
    """The architecture from config.json, refusing model types this package does not implement."""
    path = directory / "config.json"
    if not path.is_file():
        raise MissingConfigError(
            f"no config.json in {directory}: pass an HF checkpoint directory (config.json + *.safetensors)"
        )
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise SourceError(f"{path} is not valid JSON ({e}): re-download it") from e
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{path} has model_type {model_type!r}; gemma_jax converts {list(SUPPORTED_MODEL_TYPES)} checkpoints only"
        )
    try:
        return GemmaConfig.from_hf(hf)
    except ConfigError as e:
        raise InvalidConfigError(f"{path}: {e}; fix config.json or re-download the checkpoint") from None


def weight_files(directory: pathlib.Path) -> list[pathlib.Path]:
    """The shards named by the index, or the single model.safetensors."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted({directory / f for f in weight_map.values()})
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptSafetensorsError(f"{index} is not a valid safetensors index ({e!r}): re-download it") from e
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CorruptSafetensorsError(
                f"{index} names shards that are missing: {missing}; re-download the checkpoint"
            )
        return files
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    found = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
    raise SourceError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {directory} (weight files found: {found or 'none'}); only "
        "safetensors checkpoints are supported: re-save with `save_pretrained(dir, safe_serialization=True)`"
    )


def scan(directory: pathlib.Path) -> dict[str, TensorInfo]:
    """Every tensor's file, shape and dtype, from the headers alone; truncated or corrupt files fail here."""
    infos = {}
    for file in weight_files(directory):
        with _open(file) as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                s = f.get_slice(name)
                if s.get_dtype() not in _DTYPES:
                    raise SourceError(
                        f"{file.name}: tensor {name!r} has dtype {s.get_dtype()}; expected {list(_DTYPES)}"
                    )
                infos[name] = TensorInfo(file, tuple(s.get_shape()), np.dtype(_DTYPES[s.get_dtype()]))
    return infos


def read(name: str, info: TensorInfo) -> np.ndarray:
    """One tensor, copied out of its file (the mapping is dropped on return)."""
    with _open(info.file) as f:
        return f.get_tensor(name)


@contextlib.contextmanager
def _open(file: pathlib.Path) -> Iterator[Any]:
    try:
        with safe_open(file, framework="numpy") as f:
            yield f
    except SafetensorError as e:
        raise CorruptSafetensorsError(f"{file}: {e}; the file is truncated or corrupt: re-download it") from e


def parse_size(size: int | str) -> int:
    """Bytes from an int or an HF-style size string: '5GB', '500MB', '2GiB'."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read size {size!r}; write e.g. '5GB', '500MB' or a number of bytes")
    unit = (m.group(2) or "B").upper()
    power = "BKMGT".index(unit[0])
    return int(float(m.group(1)) * (1024 if "I" in unit else 1000) ** power)


def plan_shards(sizes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names packed in order into shards of at most `max_bytes` (a bigger tensor gets its own shard)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes.items():
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def shard_names(count: int) -> list[str]:
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def save_shard(tensors: Mapping[str, np.ndarray], path: pathlib.Path) -> None:
    """One safetensors shard, readable like the other files written beside it.

    safetensors writes through a private temporary file (mode 0600); the shard gets the mode a file
    created here gets (0666 less the umask), read off a probe file rather than by setting the umask.
    """
    safetensors.numpy.save_file(dict(tensors), path, metadata={"format": "pt"})
    probe = path.with_name(path.name + ".mode")
    probe.touch()
    try:
        shutil.copymode(probe, path)
    finally:
        probe.unlink()


def save_index(directory: pathlib.Path, weight_map: Mapping[str, str], total_bytes: int) -> None:
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(weight_map)}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
