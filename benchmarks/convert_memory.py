"""Peak memory and wall time of converting a Gemma-2 9B-shaped checkpoint, HF -> Orbax (and back with --export).

Builds a synthetic 9B checkpoint on disk (random finite bfloat16, HF layout: config.json, 2 GB
safetensors shards, index; 18.5 GB at 42 layers), converts it in a fresh process and reports that
process's peak RSS and wall time against baselines measured in the same run: the RSS of a process
that only imports the converter and starts JAX, the checkpoint size, and the largest parameter.
Every file it writes is deleted at the end.

    python benchmarks/convert_memory.py [--layers 42] [--workdir DIR] [--export]

--layers runs a fraction of the depth when disk or RAM is short: the streaming converter holds
one parameter at a time, so its peak does not grow with depth (the largest parameter, a stacked
MLP kernel, does grow: it is reported).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import shutil
import subprocess
import sys
import tempfile

import ml_dtypes
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout

from gemma_jax import hf_checkpoint, params
from gemma_jax.config import gemma2_9b

GB = 1e9
# Runs in a fresh process: argv[1] is "import" (the baseline) or a function of gemma_jax.checkpoint.
_CHILD = """
import json, sys, time
import jax
from gemma_jax import checkpoint
jax.devices()
start = time.perf_counter()
if sys.argv[1] != "import":
    getattr(checkpoint, sys.argv[1])(sys.argv[2], sys.argv[3], progress=False)
seconds = time.perf_counter() - start
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork and exec.
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_rss": int(hwm.split()[1]) * 1024}))
"""


def write_synthetic(directory: pathlib.Path, config, shard_bytes: int, seed: int = 0) -> int:
    """An HF-layout checkpoint of `config` with random finite bf16 tensors; returns its tensor bytes."""
    rng = np.random.default_rng(seed)
    sizes = {n: math.prod(params.hf_shape(n, config)) * 2 for n in params.hf_names(config)}
    shards = hf_checkpoint.plan_shards(sizes, shard_bytes)
    files = hf_checkpoint.shard_names(len(shards))
    directory.mkdir(parents=True)
    for file, names in zip(files, shards, strict=True):
        tensors = {}
        for name in names:
            bits = rng.integers(0, 1 << 16, sizes[name] // 2, dtype=np.uint16)
            bits &= 0xBFFF  # clear the top exponent bit: every value finite, |x| < 2
            tensors[name] = bits.view(ml_dtypes.bfloat16).reshape(params.hf_shape(name, config))
        hf_checkpoint.save_shard(tensors, directory / file)
        del tensors
        print(f"  wrote {file}", flush=True)
    weight_map = {n: f for f, names in zip(files, shards, strict=True) for n in names}
    hf_checkpoint.save_index(directory, weight_map, sum(sizes.values()))
    (directory / "config.json").write_text(json.dumps(config.to_hf() | {"dtype": "bfloat16"}, indent=2))
    return sum(sizes.values())


def measure(*argv: str) -> dict:
    """Wall time and peak RSS of one converter call in a fresh process."""
    out = subprocess.run([sys.executable, "-c", _CHILD, *argv], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=42, help="depth of the synthetic model (9B: 42)")
    parser.add_argument("--workdir", help="where the synthetic files go (default: a temp dir)")
    parser.add_argument("--export", action="store_true", help="also time Orbax -> HF")
    args = parser.parse_args()
    config = dataclasses.replace(gemma2_9b(), num_layers=args.layers)
    work = pathlib.Path(tempfile.mkdtemp(prefix="convert_memory_", dir=args.workdir))
    try:
        print(f"synthetic Gemma-2 9B shape, {args.layers} layers, in {work}", flush=True)
        size = write_synthetic(work / "hf", config, shard_bytes=2 * 10**9)
        d, f = config.hidden_size, config.intermediate_size
        largest = max(config.vocab_size * d, config.num_groups * d * f) * 2
        base = measure("import")
        conv = measure("convert_hf", str(work / "hf"), str(work / "orbax"))
        rows = [("import + start JAX (baseline)", base), ("HF -> Orbax convert_hf", conv)]
        if args.export:
            shutil.rmtree(work / "hf")  # keep disk use at two copies
            rows.append(("Orbax -> HF export_hf", measure("export_hf", str(work / "orbax"), str(work / "hf_out"))))
        print(f"checkpoint {size / GB:.2f} GB bf16; largest parameter {largest / GB:.2f} GB")
        print(f"{rows[0][0]:32s} wall {base['seconds']:7.1f} s  peak RSS {base['peak_rss'] / GB:6.2f} GB")
        for label, r in rows[1:]:
            extra = r["peak_rss"] - base["peak_rss"]
            print(
                f"{label:32s} wall {r['seconds']:7.1f} s  peak RSS {r['peak_rss'] / GB:6.2f} GB  "
                f"(+{extra / GB:.2f} GB over baseline = {extra / size:.3f} x checkpoint, "
                f"{extra / largest:.2f} x largest parameter)  {size / GB / max(r['seconds'], 1e-9):.2f} GB/s"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
