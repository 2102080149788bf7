"""HF Gemma checkpoint (directory or hub id) -> gemma_jax Orbax checkpoint.

    python convert/hf_to_orbax.py google/gemma-2-9b-it ~/ckpt/gemma-2-9b-it [--dtype bfloat16] [--revision R]

A thin CLI over `gemma_jax.checkpoint.convert_hf`; notebooks call that function directly.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from gemma_jax.checkpoint import DTYPES, convert_hf
from gemma_jax.checkpoint_errors import CheckpointError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="HF checkpoint directory (config.json + *.safetensors) or hub repo id")
    parser.add_argument("dst", help="output directory (written atomically)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="storage dtype (default: bfloat16)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace DST if it is a complete gemma_jax checkpoint (never the source)",
    )
    parser.add_argument("--revision", help="hub branch, tag or commit (hub ids only)")
    args = parser.parse_args(argv)
    try:
        convert_hf(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, revision=args.revision)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
