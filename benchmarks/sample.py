"""Sampling benchmark: prefill and decode tokens/s and KV-cache bytes of gemma_jax's Sampler vs HF `generate`.

    python benchmarks/sample.py [--prompt 128] [--new 32] [--repeats 2]

Default: float32 random weights on the default backend, for the tiny test config and a 2-layer slice of
the gemma-2-2b shape (32k vocab), each next to HF transformers (eager, same weights) on the same machine.
Prefill and decode are timed apart: ours with the Sampler's pieces (prefill / start / decode), HF's
with a logits processor that timestamps each step of one generate(1 + new) call; batch 1 and 8,
greedy. Ratios are gemma_jax / HF (higher is faster); cache bytes are ours (preallocated for prompt +
new) and HF's after generation. The 9B shape on an accelerator: `python benchmarks/attention.py --parts gpu`.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import gemma_jax as gj
from gemma_jax import tokenizer as tokenizer_lib
from gemma_jax.sampler import NO_TOKEN, Sampler
from gemma_jax.sampling import SamplingParams


def demo_tokenizer(directory: pathlib.Path) -> tokenizer_lib.Tokenizer:
    """Any Gemma-layout tokenizer will do: prompts are token ids, it supplies the stop ids and decoding."""
    return tokenizer_lib.train(
        directory / "tokenizer.model", ["The quick brown fox jumps over the lazy dog."], vocab_size=400
    )


def never_stop(embedding: jax.Array, stop_ids) -> jax.Array:
    """Zero the tied embedding rows of the stop ids: their logit is 0 while the best of the others is
    positive, so greedy decoding runs the full length on both sides and counts compare."""
    return embedding.at[jnp.asarray(stop_ids)].set(0)


def prompts(config: gj.GemmaConfig, batch: int, length: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [[2, *rng.integers(110, config.vocab_size, length - 1).tolist()] for _ in range(batch)]


# Timed runs go on past `repeats` until they fill this many seconds: a tiny model's run takes milliseconds, and the
# best of three of those moved a bf16/fp32 ratio by 20% from one benchmark run to the next.
MIN_SECONDS = 2.0


def bench_ours(sampler: Sampler, config, batch: int, length: int, new: int, repeats: int) -> dict:
    """Prefill and the decode loop timed apart, with the sampler's own pieces: the best of at least `repeats`
    runs after the compiling one, and of as many as fill `MIN_SECONDS`."""
    ids = prompts(config, batch, length)
    greedy = SamplingParams.create(batch)
    prefill_s, decode_s, decoded = float("inf"), float("inf"), 0
    runs, spent = 0, 0.0
    while runs <= repeats or spent < MIN_SECONDS:  # run 0 compiles and is not counted
        t0 = time.perf_counter()  # creating the cache is part of a request's prefill, as in `generate`
        logits, cache = jax.block_until_ready(sampler.prefill(sampler.request_cache(ids, 1 + new), ids))
        t1 = time.perf_counter()
        dstate = jax.block_until_ready(sampler.start(logits, ids, 1 + new, greedy, seed=0))
        t2, decoded = time.perf_counter(), 0
        while not bool(jnp.all(dstate.done)):
            cache, dstate, out, _ = sampler.decode(cache, dstate, sampler.decode_steps)
            decoded += int((np.asarray(out) != NO_TOKEN).sum())
        t3 = time.perf_counter()
        prefill_s, decode_s = min(prefill_s, t1 - t0), min(decode_s, t3 - t2)
        spent += (t3 - t0) if runs else 0.0
        runs += 1
    return {"prefill": batch * length / prefill_s, "decode": decoded / decode_s, "cache": cache.nbytes}


def bench_hf(hf, config, stop_ids, batch: int, length: int, new: int, repeats: int) -> dict:
    """HF generate with a logits processor that timestamps every step: prefill ends at the first, decode
    runs from the first to the last."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    x = torch.as_tensor(np.asarray(prompts(config, batch, length), np.int64))
    prefill_s, decode_s = float("inf"), float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        clock = Clock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(
                x,
                do_sample=False,
                max_new_tokens=1 + new,
                eos_token_id=list(stop_ids),
                pad_token_id=0,
                logits_processor=LogitsProcessorList([clock]),
                return_dict_in_generate=True,
            )
        prefill_s = min(prefill_s, clock.times[0] - t0)
        decode_s = min(decode_s, clock.times[-1] - clock.times[0])
    decoded = batch * (len(clock.times) - 1)
    nbytes = sum(
        t.numel() * t.element_size() for layer in out.past_key_values.layers for t in (layer.keys, layer.values)
    )
    return {"prefill": batch * length / prefill_s, "decode": decoded / decode_s, "cache": nbytes}


def compare(args, tmp: pathlib.Path) -> None:
    import torch
    import transformers

    from gemma_jax.params import from_hf_state_dict

    configs = {
        "tiny": gj.gemma2_tiny(sliding_window=64),
        "2b-shape 2 layers 32k vocab": dataclasses.replace(gj.gemma2_2b(), num_layers=2, vocab_size=32768),
    }
    tok = demo_tokenizer(tmp)
    device = jax.devices()[0].device_kind
    print(f"backend={jax.default_backend()} device={device} torch_threads={torch.get_num_threads()}")
    print(f"float32, prompt {args.prompt} tokens, {args.new} new tokens, greedy; best of {args.repeats} after warm-up")
    print(f"{'config':<28} {'batch':>5} {'metric':<10} {'gemma_jax':>12} {'HF':>12} {'ratio':>7}")
    for name, config in configs.items():
        torch.manual_seed(0)
        hf_config = transformers.Gemma2Config(**config.to_hf(), attn_implementation="eager")
        hf = transformers.Gemma2ForCausalLM(hf_config).eval()
        with torch.no_grad():
            hf.model.embed_tokens.weight[list(tok.stop_ids)] = 0.0  # as never_stop: both run the full length
        sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
        model = gj.from_params(config, from_hf_state_dict(sd, config))
        sampler = Sampler(model, tok, cache_length=args.prompt + args.new + 1, prefill_chunk=2048)
        for batch in (1, 8):
            ours = bench_ours(sampler, config, batch, args.prompt, args.new, args.repeats)
            theirs = bench_hf(hf, config, tok.stop_ids, batch, args.prompt, args.new, args.repeats)
            for metric, unit in (("prefill", "tok/s"), ("decode", "tok/s"), ("cache", "bytes")):
                a, b = ours[metric], theirs[metric]
                ratio = b / a if metric == "cache" else a / b  # >1: we are faster / smaller
                print(f"{name:<28} {batch:>5} {metric + ' ' + unit:<10} {a:>12.4g} {b:>12.4g} {ratio:>6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new", type=int, default=32, help="decoded tokens")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        compare(args, pathlib.Path(tmp))


if __name__ == "__main__":
    main()
