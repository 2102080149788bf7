"""GGUF file (llama.cpp; Gemma 2 or Gemma 3) -> gemma_jax Orbax checkpoint, dequantized, tokenizer rebuilt.

    python convert/gguf_to_orbax.py gemma-3-270m-q4_k_m.gguf ~/ckpt/gemma-3-270m [--dtype bfloat16] [--overwrite]

A thin CLI over `gemma_jax.gguf.convert_gguf`; notebooks call that function directly.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from gemma_jax.checkpoint_errors import CheckpointError
from gemma_jax.gguf import DTYPES, convert_gguf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="GGUF file (architecture gemma2 or gemma3)")
    parser.add_argument("dst", help="output directory (written atomically)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="storage dtype (default: bfloat16)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace DST if it is a complete gemma_jax checkpoint (never the source)",
    )
    args = parser.parse_args(argv)
    try:
        convert_gguf(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
