"""Fill-aware attention: what a user gets with the defaults (a 16k cache) against a request-sized cache, HF
transformers and DeepMind `gemma`, measured in one run and printed as ratios (never absolute targets).

    python benchmarks/attention.py                    # real, step, memory (CPU, about 10 min on 2 cores)
    python benchmarks/attention.py --parts peers --dm-python ../gmvenv/bin/python   # + DM gemma and HF
    python benchmarks/attention.py --parts gpu        # on a GPU/TPU: 9B shape, bf16 and FP8 (under 8 min)

Parts:
  real    the embedded Gemma 3 270M, float32, greedy, 64 new tokens, batch 1 and 4, 5- and 512-token prompts:
          decode tok/s and prefill time with the defaults (a 16k context, of which `generate` allocates what
          the request needs rounded up to 256, 1k, 4k or 16k slots: `request_cache_length`), with a Sampler whose
          whole context is the request, and with HF `generate` on the same GGUF weights. Prefill includes
          creating the cache, as `generate` does.
  step    gemma-2-2b shape, 2 layers, bf16, batch 8, 128 tokens filled: one decode step at capacity 16k vs 1k.
  memory  a compiled 2048-token prefill chunk into a 16k cache vs a 2k cache: XLA's temporary bytes.
  peers   the configs of ../shared/peers (tiny and 2b-slice, fp32 and bf16, batch 1 and 8, 512-token prompt):
          ours with the defaults (16k context) beside HF (eager) and DeepMind `gemma`, each run by its own script in
          a subprocess (DM needs its own venv: --dm-python; see ../shared/peers/README.md).
  bf16    the real 270M on 500+ tokens of fixed text (README.md): bfloat16 against float32 logits, top-1
          agreement and the largest logit difference; and its decode tok/s in both (which default is faster).
  gpu     9B shape, random weights, bf16 and FP8, batch 1 and 16, 128 and 8k tokens filled, 16k cache:
          decode tok/s and the fraction of the HBM roofline; 2k-token prefill MFU.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

import gemma_jax as gj
from gemma_jax import sampler as sampler_lib
from gemma_jax.sampler import Sampler
from gemma_jax.sampling import SamplingParams

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from sample import bench_hf, bench_ours, never_stop, prompts

PEERS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "peers"
DEFAULT_CACHE = 16384
# HBM bandwidth, bytes/s, by device kind (public spec sheets); unknown kinds print no floor.
BANDWIDTH = {
    "H100": 3.35e12,
    "H200": 4.8e12,
    "A100": 2.0e12,
    "TPU v4": 1.2e12,
    "TPU v5 lite": 8.2e11,
    "TPU v5p": 2.76e12,
}
# Dense bf16 peak FLOP/s by device kind (public spec sheets), for MFU.
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
}


@dataclasses.dataclass(frozen=True)
class IdTokenizer:
    """What the Sampler needs of a tokenizer when prompts are token ids: the vocabulary, stop and pad ids."""

    vocab_size: int
    stop_ids: tuple[int, ...] = (1, 107)
    pad_id: int = 0


def random_model(config: gj.GemmaConfig, dtype, tok: IdTokenizer) -> gj.Transformer:
    model = gj.Transformer(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    model.embedder.embedding.set_value(never_stop(model.embedder.embedding.get_value(), tok.stop_ids))
    return model


def ratio_line(label: str, value: float, bound: str) -> str:
    return f"  {label:<58} {value:6.2f}x  (target {bound})"


# ------------------------------------------------------------------------------------------------- real


def part_real(args) -> None:
    import torch
    import transformers

    from gemma_jax import checkpoint, default_model
    from gemma_jax.tokenizer import Tokenizer

    torch.set_num_threads(2)
    ckpt = default_model.ensure()
    model = checkpoint.load_model(ckpt, dtype=jnp.float32)
    tok = Tokenizer.from_dir(ckpt)
    with tempfile.TemporaryDirectory() as tmp:
        package = importlib.import_module(default_model.MODULE)  # the package that carries the GGUF
        gguf = default_model.assemble(package, pathlib.Path(tmp) / package.MODEL_NAME)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32).eval()
    new = 64
    print(f"\n## real: Gemma 3 270M, float32, greedy, {new} new tokens, best of {args.repeats} (torch threads 2)")
    print(
        f"{'prompt':>6} {'batch':>5} | {'decode tok/s: 16k':>17} {'sized':>7} {'HF':>7} | {'prefill s: 16k':>14} "
        f"{'sized':>6} {'HF':>6} | 16k/sized 16k/HF prefill 16k/sized"
    )
    for length in (5, 512):
        for batch in (1, 4):
            default = bench_ours(Sampler(model, tok), model.config, batch, length, new, args.repeats)
            sized = bench_ours(
                Sampler(model, tok, cache_length=length + new + 1), model.config, batch, length, new, args.repeats
            )
            theirs = bench_hf(hf, model.config, tok.stop_ids, batch, length, new, args.repeats)
            pre = {k: batch * length / r["prefill"] for k, r in (("16k", default), ("sized", sized), ("HF", theirs))}
            print(
                f"{length:>6} {batch:>5} | {default['decode']:>17.1f} {sized['decode']:>7.1f} "
                f"{theirs['decode']:>7.1f} | "
                f"{pre['16k']:>14.3f} {pre['sized']:>6.3f} {pre['HF']:>6.3f} | "
                f"{default['decode'] / sized['decode']:>9.2f} {default['decode'] / theirs['decode']:>6.2f} "
                f"{pre['16k'] / pre['sized']:>17.2f}"
            )
    print("targets: decode 16k/sized >= 0.9, 16k/HF >= 1.4; prefill 16k/sized <= 1.1")


# ------------------------------------------------------------------------------------------------- step


def two_layer_2b() -> gj.GemmaConfig:
    return dataclasses.replace(gj.gemma2_2b(), num_layers=2)


def decode_step_seconds(sampler: Sampler, config, batch: int, filled: int, steps: int, repeats: int) -> float:
    """Seconds per decode step with `filled` tokens in every row (the best of `repeats` calls of `steps` steps)."""
    ids = prompts(config, batch, filled)
    logits, cache = sampler.prefill(sampler.new_cache(batch), ids)
    dstate = sampler.start(logits, ids, 1 + steps * (repeats + 1), SamplingParams.create(batch), seed=0)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call compiles
        t = time.perf_counter()
        cache, dstate, _, _ = jax.block_until_ready(sampler.decode(cache, dstate, steps))  # decode returns at dispatch
        best = min(best, time.perf_counter() - t)
    return best / steps


def part_step(args) -> None:
    config = two_layer_2b()
    tok = IdTokenizer(config.vocab_size)
    model = random_model(config, jnp.bfloat16, tok)
    times = {
        cap: decode_step_seconds(Sampler(model, tok, cache_length=cap), config, 8, 128, 8, args.repeats)
        for cap in (1024, DEFAULT_CACHE)
    }
    print("\n## step: gemma-2-2b shape, 2 layers, bf16, batch 8, 128 tokens filled")
    for cap, s in times.items():
        print(f"  capacity {cap:>5}: {s * 1e3:8.1f} ms/step")
    print(ratio_line("step time 16k / 1k", times[DEFAULT_CACHE] / times[1024], "<= 1.15"))


# ----------------------------------------------------------------------------------------------- memory


def prefill_temp_bytes(config, capacity: int, chunk: int, dtype) -> int:
    """XLA's temporary bytes of one compiled prefill chunk (nothing is allocated: shapes only)."""
    graphdef, state = nnx.split(gj.abstract_model(config, dtype=dtype, param_dtype=dtype))
    cache = jax.eval_shape(lambda: gj.KVCache.create(config, 1, capacity, dtype))
    tokens = jax.ShapeDtypeStruct((1, chunk), jnp.int32)
    mask = jax.ShapeDtypeStruct((1, chunk), bool)
    compiled = sampler_lib._prefill_chunk.lower(graphdef, state, cache, tokens, tokens, mask).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def part_memory(args) -> None:
    config, chunk = two_layer_2b(), 2048
    temp = {cap: prefill_temp_bytes(config, cap, chunk, jnp.bfloat16) for cap in (2048, DEFAULT_CACHE)}
    print(f"\n## memory: compiled {chunk}-token prefill chunk, gemma-2-2b shape, 2 layers, bf16, batch 1")
    for cap, b in temp.items():
        print(f"  cache {cap:>5}: {b / 1e6:8.1f} MB temporary")
    print(ratio_line("temporary memory 16k / 2k", temp[DEFAULT_CACHE] / temp[2048], "<= 1.25"))


# ------------------------------------------------------------------------------------------------ peers


def load_peer_module(name: str):
    spec = importlib.util.spec_from_file_location(name, PEERS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peer_config(name: str) -> gj.GemmaConfig:
    hf = load_peer_module("hf_baseline")
    return gj.GemmaConfig.from_hf({**hf.CONFIGS[name], **hf.COMMON, "model_type": "gemma2"})


def run_peer(cmd: list[str], out: pathlib.Path) -> dict:
    """A peer script's JSON results, or {} (with its error printed) when it fails."""
    print(f"  running {' '.join(cmd[:2])} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        print(f"  failed (rc {proc.returncode}): {proc.stderr[-800:]}")
        return {}
    return json.loads(out.read_text())


def part_peers(args) -> None:
    new = {"tiny": 128, "2b-slice": 32}
    length, batches, dtypes = 512, (1, 8), ("float32", "bfloat16")
    ours: dict = {}
    for name in ("tiny", "2b-slice"):
        config = peer_config(name)
        tok = IdTokenizer(config.vocab_size)
        for dtype in dtypes:
            model = random_model(config, jnp.dtype(dtype), tok)
            for batch in batches:
                r = bench_ours(Sampler(model, tok), config, batch, length, new[name], args.repeats)
                ours[name, dtype, batch] = (r["prefill"], r["decode"])
                print(
                    f"  ours {name} {dtype} b{batch}: prefill {r['prefill']:.1f} tok/s, decode {r['decode']:.1f} tok/s",
                    flush=True,
                )
    hf, dm = {}, {}
    if args.ours_only:
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "hf.json"
        doc = run_peer(
            [
                sys.executable,
                str(PEERS / "hf_baseline.py"),
                "--attns",
                "eager",
                "--caches",
                "default",
                "--out",
                str(out),
            ],
            out,
        )
        for r in doc.get("results", []):
            for batch in batches:
                hf[r["model"], r["dtype"], batch] = (
                    r["prefill"][f"b{batch}"]["tok_s"],
                    r["decode"][f"default/b{batch}"]["decode_tok_s"],
                )
        if args.dm_python:
            out = pathlib.Path(tmp) / "dm.json"
            doc = run_peer([args.dm_python, str(PEERS / "dm_gemma_baseline.py"), "--out", str(out)], out)
            for r in doc.get("results", []):
                for batch in batches:
                    res = r["results"][f"b{batch}"]
                    dm[r["model"], r["dtype"], batch] = (res["prefill_tok_s"], res["decode_tok_s"])
    print("\n## peers: tok/s, ours with the defaults (16k context); HF eager and DM gemma as their scripts run them")
    print(
        f"{'case':<26} | {'prefill ours':>12} {'HF':>8} {'DM':>8} | {'decode ours':>11} {'HF':>8} {'DM':>8} | "
        "prefill /DM  decode /DM /HF   bf16/fp32"
    )
    for (name, dtype, batch), (p, d) in ours.items():
        hp, hd = hf.get((name, dtype, batch), (float("nan"),) * 2)
        mp, md = dm.get((name, dtype, batch), (float("nan"),) * 2)
        fp32 = ours[name, "float32", batch][1]
        print(
            f"{name + ' ' + dtype + ' b' + str(batch):<26} | {p:>12.1f} {hp:>8.1f} {mp:>8.1f} | {d:>11.1f} "
            f"{hd:>8.1f} {md:>8.1f} | {p / mp:>11.2f} {d / md:>11.2f} {d / hd:>4.2f} {d / fp32:>10.2f}"
        )
    print("targets: prefill /DM >= 1.0, decode /DM >= 1.2 on every case; bf16/fp32 >= 1.0")


# ------------------------------------------------------------------------------------------------- bf16


def part_bf16(args) -> None:
    from gemma_jax import checkpoint, default_model
    from gemma_jax.tokenizer import Tokenizer

    ckpt = default_model.ensure()
    tok = Tokenizer.from_dir(ckpt)
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()[:2500]
    ids = jnp.asarray([tok.encode(text)])
    logits = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model = checkpoint.load_model(ckpt, dtype=dtype)
        logits[dtype] = jax.jit(lambda m, x: m(x)[0])(model, ids)[0]
    f32, bf16 = logits[jnp.float32], logits[jnp.bfloat16]
    agree = float(jnp.mean(jnp.argmax(f32, -1) == jnp.argmax(bf16, -1)))
    print(f"\n## bf16: Gemma 3 270M, {ids.shape[1]} tokens of README.md, bfloat16 vs float32 logits")
    print(f"  top-1 agreement {agree:.4f}, max |logit diff| {float(jnp.max(jnp.abs(f32 - bf16))):.3f}")
    speed = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model = checkpoint.load_model(ckpt, dtype=dtype)
        speed[dtype] = bench_ours(Sampler(model, tok), model.config, 1, 128, 32, args.repeats)["decode"]
        print(
            f"  decode {jnp.dtype(dtype).name:<8}: {speed[dtype]:.1f} tok/s (batch 1, 128-token prompt, default cache)"
        )
    print(ratio_line("decode bf16 / float32", speed[jnp.bfloat16] / speed[jnp.float32], ">= 1.0 for bf16 as a default"))


# -------------------------------------------------------------------------------------------------- gpu


def part_gpu(args) -> None:
    from gemma_jax import fp8

    config = gj.gemma2_9b()
    kind = jax.devices()[0].device_kind
    bandwidth = next((bw for k, bw in BANDWIDTH.items() if k in kind), None)
    peak = next((f for k, f in PEAK_FLOPS.items() if k in kind), None)
    tok = IdTokenizer(config.vocab_size)
    t0 = time.perf_counter()
    model = random_model(config, jnp.bfloat16, tok)
    print(f"\n## gpu: {kind}, 9B shape, random weights, init {time.perf_counter() - t0:.0f} s, cache {DEFAULT_CACHE}")
    for quant in (None, fp8.WEIGHT_ONLY):
        if quant is not None:
            model = fp8.quantize_model(model, quant)
        weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        sampler = Sampler(model, tok)
        label = quant or "bf16"
        for batch in (1, 16):
            for filled in (128, 8192):
                step = decode_step_seconds(sampler, config, batch, filled, 16, 2)
                cache_read = sampler.new_cache(1).nbytes * batch * min(1.0, (filled + 16) / DEFAULT_CACHE)
                line = f"  {label:<12} batch {batch:>2} filled {filled:>5}: {batch / step:8.1f} tok/s"
                line += f", {step * 1e3:6.2f} ms/step"
                if bandwidth:  # every weight once and the filled cache once per step
                    floor = (weight_bytes + cache_read) / bandwidth
                    line += f", HBM roofline {floor * 1e3:.2f} ms ({floor / step:.0%} of it)"
                print(line, flush=True)
        chunk = 2048
        ids = prompts(config, 1, chunk)
        cache = sampler.new_cache(1)
        jax.block_until_ready(sampler.prefill(cache, ids))
        cache = jax.block_until_ready(sampler.new_cache(1))
        t = time.perf_counter()
        jax.block_until_ready(sampler.prefill(cache, ids))
        s = time.perf_counter() - t
        params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        flops = 2 * params * chunk + 4 * config.num_layers * config.num_heads * config.head_dim * chunk * chunk / 2
        line = f"  {label:<12} prefill {chunk} tokens: {s * 1e3:.0f} ms, {flops / s / 1e12:.0f} TFLOP/s"
        print(line + (f", MFU {flops / s / peak:.0%}" if peak else ""), flush=True)


PARTS = {
    "real": part_real,
    "step": part_step,
    "memory": part_memory,
    "peers": part_peers,
    "bf16": part_bf16,
    "gpu": part_gpu,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="real,step,memory", help=f"comma-separated, of {','.join(PARTS)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up; the best is kept")
    parser.add_argument("--dm-python", default=None, help="python of a venv with DeepMind gemma (peers part)")
    parser.add_argument("--ours-only", action="store_true", help="peers part: time gemma_jax only (a before/after run)")
    args = parser.parse_args()
    parts = args.parts.split(",")
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown part(s) {sorted(unknown)}; choose from {sorted(PARTS)}")
    print(f"backend {jax.default_backend()}, device {jax.devices()[0].device_kind}, jax {jax.__version__}")
    for part in parts:
        PARTS[part](args)


if __name__ == "__main__":
    main()
