"""gemma_jax Orbax checkpoint -> HF directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    python convert/orbax_to_hf.py ~/ckpt/my-finetune ~/hf/my-finetune [--dtype bfloat16] [--max-shard-size 5GB]

Writes config.json, safetensors shards + model.safetensors.index.json and the tokenizer files.
A thin CLI over `gemma_jax.checkpoint.export_hf`.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from gemma_jax.checkpoint import DTYPES, export_hf
from gemma_jax.checkpoint_errors import CheckpointError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="gemma_jax checkpoint directory")
    parser.add_argument("dst", help="output HF directory (written atomically)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="tensor dtype (default: as stored)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: 5GB)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace DST if it is an HF export this tool wrote (never the source)"
    )
    args = parser.parse_args(argv)
    try:
        export_hf(args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
