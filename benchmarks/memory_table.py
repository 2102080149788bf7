"""Bytes per device of Gemma-2 weights, optimizer state and a 16k KV cache under typical meshes.

Computed from shapes alone: `jax.eval_shape` of the model and the cache, and the shardings
`gemma_jax.sharding` derives for them on an `AbstractMesh`. Nothing is allocated and no accelerator is
needed, so it runs anywhere in seconds. The table in docs/sharding.md is this script's output:

    python benchmarks/memory_table.py

Weights are bfloat16; the optimizer state is the SPPO trainer's RMSProp, one float32 value per parameter
sharded like the parameter (Adam keeps two: double that column; float32 master weights add twice the
weights column). The KV cache holds BATCH sequences of CACHE_LENGTH tokens in bfloat16 (sliding layers keep
a 4096-slot ring). Activations and gradients are not counted.

A second table gives the 9B cache at 16k for each cache dtype (`Sampler(cache_dtype=...)`, `--cache-dtype`):
per sequence, and per chip for 8 sequences on a v5e-8 under fsdp=8. The 8-bit caches (fp8, int8) store keys
and values in one byte plus a float32 scale per (token, kv head) each.
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
CACHE_DTYPES = ("float32", "bfloat16", "fp8", "int8")
GB = 1e9
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


def cache_parts(dtype: str) -> tuple[int, int, int]:
    """Bytes of the 9B cache for one sequence of CACHE_LENGTH: (keys + values, their scales, positions)."""
    cache = jax.eval_shape(lambda: gj.KVCache.create(gj.gemma2_9b(), 1, CACHE_LENGTH, dtype))
    layers = [*cache.groups, *cache.tail]

    def size(*arrays) -> int:
        return sum(x.size * x.dtype.itemsize for x in arrays if x is not None)

    return (
        sum(size(c.k, c.v) for c in layers),
        sum(size(c.k_scale, c.v_scale) for c in layers),
        sum(size(c.positions) for c in layers),
    )


def cache_table() -> str:
    """The 9B KV cache at CACHE_LENGTH per cache dtype: GB per sequence by part, and GiB per v5e chip for BATCH rows."""
    mesh = shd.abstract_mesh("fsdp=8", HARDWARE["v5e-8"][0])
    parts = {dtype: cache_parts(dtype) for dtype in CACHE_DTYPES}
    lines = [
        f"| cache dtype | keys + values | scales | positions | 9b, 1 x 16k (GB) | x bf16 "
        f"| {BATCH} x 16k per v5e-8 chip, `fsdp=8` (GiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for dtype, sizes in parts.items():
        batch = jax.eval_shape(lambda d=dtype: gj.KVCache.create(gj.gemma2_9b(), BATCH, CACHE_LENGTH, d))
        chip = bytes_per_device(batch, shd.cache_shardings(batch, mesh))
        cells = " | ".join(f"{b / GB:.3f}" for b in (*sizes, sum(sizes)))
        ratio = sum(sizes) / sum(parts["bfloat16"])
        lines.append(f"| {dtype} | {cells} | {ratio:.3f} | {chip / GIB:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
    print()
    print(cache_table())
