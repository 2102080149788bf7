"""Bytes per device of Gemma-2 weights, optimizer state and a 16k KV cache under typical meshes.

Computed from shapes alone: `jax.eval_shape` of the model and the cache, and the shardings
`gemma_jax.sharding` derives for them on an `AbstractMesh`. Nothing is allocated and no accelerator is
needed, so it runs anywhere in seconds. The table in docs/sharding.md is this script's output:

    python benchmarks/memory_table.py

Weights are bfloat16; the optimizer state is the SPPO trainer's RMSProp, one float32 value per parameter
sharded like the parameter (Adam keeps two: double that column; float32 master weights add twice the
weights column). The KV cache holds BATCH sequences of CACHE_LENGTH tokens in bfloat16 (sliding layers keep
a 4096-slot ring). Activations and gradients are not counted.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout

import gemma_jax as gj
from gemma_jax import sharding as shd

GIB = 2**30
# chips, HBM per chip in GiB (vendor figures)
HARDWARE = {"v5e-8": (8, 16), "v5p-8": (4, 95), "8xH100": (8, 80)}
MESHES = {
    "v5e-8": ("fsdp=8", "fsdp=2,tensor=4"),
    "v5p-8": ("fsdp=4", "tensor=4"),
    "8xH100": ("fsdp=8", "tensor=8"),
}
MODELS = {"2b": gj.gemma2_2b, "9b": gj.gemma2_9b, "27b": gj.gemma2_27b}
BATCH, CACHE_LENGTH = 8, 16384
WEIGHT_DTYPE = jnp.bfloat16
OPTIMIZER_BYTES = 4  # RMSProp: one float32 per parameter


@dataclasses.dataclass(frozen=True)
class Row:
    model: str
    hardware: str
    mesh: str
    weights: int  # bytes on one device
    optimizer: int
    cache: int

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.cache


def bytes_per_device(tree, shardings) -> int:
    """Bytes one device holds of `tree` (the shardings divide evenly: every device holds the same)."""
    pairs = zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True)
    return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize for x, s in pairs)


def row(model: str, hardware: str, spec: str) -> Row:
    config = MODELS[model]()
    mesh = shd.abstract_mesh(spec, HARDWARE[hardware][0])
    abstract = gj.abstract_model(config, dtype=WEIGHT_DTYPE, param_dtype=WEIGHT_DTYPE)
    weights = bytes_per_device(gj.params_of(abstract), shd.param_shardings(abstract, mesh))
    cache = jax.eval_shape(lambda: gj.KVCache.create(config, BATCH, CACHE_LENGTH, WEIGHT_DTYPE))
    optimizer = weights // jnp.dtype(WEIGHT_DTYPE).itemsize * OPTIMIZER_BYTES
    return Row(model, hardware, spec, weights, optimizer, bytes_per_device(cache, shd.cache_shardings(cache, mesh)))


def rows() -> list[Row]:
    return [row(m, hw, spec) for m in MODELS for hw, specs in MESHES.items() for spec in specs]


def table() -> str:
    """The markdown table: GiB per device, and the share of one chip's HBM the total takes."""
    head = (
        "| model | hardware (HBM/chip) | mesh | weights bf16 | RMSProp fp32 "
        "| KV cache 8 x 16k bf16 | total | of HBM |\n"
        "|---|---|---|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows():
        hbm = HARDWARE[r.hardware][1]
        cells = [f"{b / GIB:.2f}" for b in (r.weights, r.optimizer, r.cache, r.total)]
        lines.append(
            f"| {r.model} | {r.hardware} ({hbm} GiB) | `{r.mesh}` | {' | '.join(cells)} | {r.total / GIB / hbm:.0%} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
