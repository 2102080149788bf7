"""What the command-line tools (`gemma_jax.sample`, `gemma_jax.serve`) share: help that shows every
default, the model that `--checkpoint` names (the embedded default model when it is not given), and
a persistent cache of compiled programs."""

from __future__ import annotations

import argparse
import os
import pathlib

import jax

from gemma_jax import checkpoint, default_model


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with "(default: ...)" after each option, except where the help text already says
    it or the option defaults to nothing (None, or False for a flag), so a newcomer sees what runs."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def resolve_checkpoint(
    source: str | None, *, cache_dir: str | os.PathLike | None = None, dtype: str = "bfloat16"
) -> pathlib.Path:
    """`--checkpoint` as a local checkpoint (HF sources converted once into the cache, `checkpoint.resolve`);
    None: the embedded default model (`default_model.ensure`), converted on first use."""
    if source:
        return checkpoint.resolve(source, cache_dir=cache_dir, dtype=dtype)
    return default_model.ensure(cache_dir)


def use_compilation_cache(cache_dir: str | os.PathLike | None = None) -> None:
    """Keep XLA's compiled programs in `<cache>/xla` (JAX's persistent compilation cache): a later run
    loads them instead of compiling, which halves a short run on a CPU (the README's first command:
    48 s -> 23 s on a busy 2-core machine). $JAX_COMPILATION_CACHE_DIR, when set, decides instead (empty: off)."""
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(default_model.cache_dir(cache_dir) / "xla"))


def default_dtype(embedded: bool) -> str:
    """float32 for the embedded model and on CPU, else bfloat16. The CLI decodes one row, and there XLA's CPU
    bf16 matmul (two rows, the padded one-row case) streams weights at about 12 GB/s against 27 for its float32
    GEMV, so half the bytes do not pay: 270M about even (21.0 vs 21.3 tok/s, 18.1 vs 17.8 in another run),
    gemma-2-2b slice 7.0 vs 7.6; at batch 8 bf16 is faster (41.2 vs 28.1). benchmarks/attention.py --parts
    bf16,peers."""
    if embedded:
        return default_model.DTYPE
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
