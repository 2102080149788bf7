"""Forward-pass benchmark: compile time and tokens/s of gemma_jax vs HF transformers, same machine and inputs.

    python benchmarks/forward.py [--batch 1] [--length 128] [--repeats 5]

Configs: the tiny test config, and a 4-layer slice of the gemma-2-2b shape (random weights).
Prints one row per config with the ratio gemma_jax / HF (tokens/s), both in float32 on the default backend.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

import gemma_jax as gj


def bench_ours(config, tokens, repeats):
    model = gj.Transformer(config, rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda m, t: m(t)[0])
    x = jnp.asarray(tokens)
    t0 = time.perf_counter()
    forward(model, x).block_until_ready()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeats):
        forward(model, x).block_until_ready()
    return compile_s, (time.perf_counter() - t0) / repeats


def bench_hf(config, tokens, repeats):
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(**config.to_hf(), attn_implementation="eager")
    ).eval()
    x = torch.as_tensor(tokens.astype(np.int64))
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(x)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(x)
    return first_s, (time.perf_counter() - t0) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    configs = {
        "tiny": gj.gemma2_tiny(),
        "2b-shape, 4 layers": dataclasses.replace(gj.gemma2_2b(), num_layers=4),
    }
    print(f"backend={jax.default_backend()} devices={jax.devices()} torch_threads={torch.get_num_threads()}")
    print(f"batch={args.batch} length={args.length} float32, mean of {args.repeats} runs after the first")
    header = f"{'config':<20} {'jax compile s':>13} {'jax tok/s':>11} {'hf first s':>10} {'hf tok/s':>10} {'ratio':>7}"
    print(header)
    n_tokens = args.batch * args.length
    for name, config in configs.items():
        tokens = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.length)).astype(np.int32)
        compile_s, ours_s = bench_ours(config, tokens, args.repeats)
        first_s, hf_s = bench_hf(config, tokens, args.repeats)
        print(
            f"{name:<20} {compile_s:>13.2f} {n_tokens / ours_s:>11.0f} {first_s:>10.2f} "
            f"{n_tokens / hf_s:>10.0f} {hf_s / ours_s:>6.2f}x"
        )
    # Layers are scanned, so compile time should not grow with depth.
    tokens = np.zeros((args.batch, args.length), np.int32)
    times = {depth: bench_ours(gj.gemma2_tiny(num_layers=depth), tokens, 1)[0] for depth in (4, 42)}
    print(f"tiny compile s at 4 layers: {times[4]:.2f}, at 42 layers: {times[42]:.2f} ({times[42] / times[4]:.2f}x)")


if __name__ == "__main__":
    main()
