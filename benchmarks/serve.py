"""Serving benchmark: `python -m gemma_jax.serve` under 1, 4 and 16 concurrent clients, then a burst, in one run.

Levels: starts the server on a free local port (it compiles every program before the port opens), then
for each concurrency level runs that many clients, each sending streaming completions back to back until
--requests have been sent. Request i always has the same prompt and seed, so every level generates
the same tokens. Prints, per level: output tokens/s of the whole server and its ratio to one client
(the baseline, measured in the same run), median and p99 time to first token (TTFT), median and p99
inter-token latency (ITL: the gap between streamed chunks; a chunk holds up to --decode-steps tokens)
and the median time per output token of a request (TPOT = (latency - TTFT) / (tokens - 1)), and how many
programs the server compiled after it was ready (`gemma_jax_compiles_total`; should be 0).

Burst (in this process, the server's Engine and Sampler on the same weights, after the server stopped):
  - 32 requests arrive at once (32 slots), prompts of 16 to --burst-longest tokens: the time until all 32
    have their first token, over the time of one batched prefill of the same 32 prompts plus one decode
    call (target <= 1.5x);
  - programs compiled after the engine was ready (target 0);
  - decode tokens/s with 16 busy rows (16 slots), over `Sampler.generate`'s decode loop at batch 16 on
    the same prompts (target >= 0.9x).

    python benchmarks/serve.py --checkpoint PATH_OR_HUB_ID [--dtype fp8] [--slots 16] [--cache-length 16384]
    python benchmarks/serve.py --dtype f32 --scenarios burst   # the embedded 270M on a CPU
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import jax
import numpy as np
import openai

from gemma_jax import cli
from gemma_jax.sampler import NO_TOKEN
from gemma_jax.sampling import SamplingParams
from gemma_jax.serve import Engine, GenerationParams
from gemma_jax.serve.__main__ import load_sampler
from gemma_jax.serve.metrics import compiles

HOST = "127.0.0.1"
MODEL = "bench"
TEXT = (
    "The history of computing is a story of abstractions: from switches to gates, from gates to instructions, "
    "from instructions to languages, and from languages to libraries that let a researcher write a model in an "
    "afternoon and run it on thousands of chips. Each layer hides the one below it, and each one leaks a little. "
)


@dataclasses.dataclass
class Result:
    ttft: float
    gaps: list[float]
    latency: float
    tokens: int


def prompt(i: int, words: int) -> str:
    """Request i's prompt: `words` words of TEXT, starting at a different word for each request."""
    pool = TEXT.split() * (words // len(TEXT.split()) + 2)
    start = i % len(TEXT.split())
    return " ".join(pool[start : start + words])


async def one(client: openai.AsyncOpenAI, i: int, args: argparse.Namespace) -> Result:
    start = time.perf_counter()
    arrivals, tokens = [], 0
    stream = await client.completions.create(
        model=MODEL,
        prompt=prompt(i, args.prompt_words),
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=i,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    arrivals = arrivals or [end]
    return Result(arrivals[0] - start, list(np.diff(arrivals)), end - start, tokens)


async def level(url: str, clients: int, args: argparse.Namespace) -> tuple[list[Result], float]:
    """`clients` clients sending requests back to back until args.requests are done; (results, wall seconds)."""
    queue = list(range(args.requests))
    results: list[Result] = []

    async def client_loop(client: openai.AsyncOpenAI) -> None:
        while queue:
            results.append(await one(client, queue.pop(0), args))

    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600) as client:
        await one(client, 0, args)  # a first request (not timed): the server compiled everything before ready
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        return results, time.perf_counter() - start


def row(clients: int, results: list[Result], wall: float, baseline: float | None) -> tuple[str, float]:
    tokens = sum(r.tokens for r in results)
    throughput = tokens / wall
    ttft = np.array([r.ttft for r in results]) * 1e3
    gaps = np.array([g for r in results for g in r.gaps] or [np.nan]) * 1e3
    tpot = np.array([(r.latency - r.ttft) / (r.tokens - 1) for r in results if r.tokens > 1] or [np.nan]) * 1e3
    ratio = throughput / baseline if baseline else 1.0
    cells = [
        f"{clients}",
        f"{len(results)}",
        f"{tokens / len(results):.0f}",
        f"{throughput:.1f}",
        f"{ratio:.2f}x",
        f"{np.median(ttft):.0f}",
        f"{np.percentile(ttft, 99):.0f}",
        f"{np.median(gaps):.1f}",
        f"{np.percentile(gaps, 99):.1f}",
        f"{np.median(tpot):.1f}",
    ]
    return "| " + " | ".join(cells) + " |", throughput


@contextlib.contextmanager
def server(args: argparse.Namespace):
    """The server in a subprocess on a free local port; yields its URL, then SIGTERMs it."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "gemma_jax.serve", "--host", HOST]
    command += ["--checkpoint", args.checkpoint] if args.checkpoint else []
    command += ["--port", str(port), "--served-model-name", MODEL, "--dtype", args.dtype, "--log-level", "warning"]
    command += ["--slots", str(args.slots), "--cache-length", str(args.cache_length)]
    command += ["--decode-steps", str(args.decode_steps)]
    if "--max-prompt-tokens" not in args.server_args:  # start-up compiles the buckets up to it: those of these prompts
        command += ["--max-prompt-tokens", str(min(4 * args.prompt_words, args.cache_length - args.max_tokens))]
    command += args.server_args
    url = f"http://{HOST}:{port}"
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            start = time.perf_counter()
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise SystemExit(f"the server exited with status {proc.returncode}:\n{log.read()[-4000:]}")
                with contextlib.suppress(OSError):
                    if urllib.request.urlopen(f"{url}/health").status == 200:
                        break
                time.sleep(0.5)
            print(f"server ready in {time.perf_counter() - start:.0f} s (load + compile)", flush=True)
            yield url
        finally:
            proc.terminate()
            proc.wait(120)


def compiled(url: str) -> float:
    """The server's gemma_jax_compiles_total."""
    text = urllib.request.urlopen(f"{url}/metrics").read().decode()
    return float(re.search(r"^gemma_jax_compiles_total (\S+)$", text, re.M).group(1))


def levels(args: argparse.Namespace) -> None:
    counts = [int(c) for c in args.concurrency.split(",")]
    with server(args) as url:
        ready = compiled(url)
        header = f"| clients | requests | out tok/req | out tok/s | vs {counts[0]} | TTFT p50 ms | TTFT p99 ms "
        print(header + "| ITL p50 ms | ITL p99 ms | TPOT p50 ms |")
        print("|---" * 10 + "|")
        baseline = None
        for clients in counts:
            results, wall = asyncio.run(level(url, clients, args))
            line, throughput = row(clients, results, wall, baseline)
            baseline = baseline or throughput
            print(line, flush=True)
        print(f"programs compiled by the server after ready: {compiled(url) - ready:.0f}")


async def run_engine(
    engine: Engine, prompts: list[list[int]], max_tokens: int
) -> tuple[float, list[float], float, int]:
    """Submit every prompt at once (greedy): (submit time, each request's first-token time, end time, tokens)."""
    engine.start()
    start = time.perf_counter()
    handles = [engine.submit([p], [GenerationParams(max_tokens=max_tokens, temperature=0)]) for p in prompts]

    async def follow(handle) -> tuple[float, int]:
        first, tokens = None, 0
        async for _, out in handle:
            first = first or time.perf_counter()
            tokens = out.completion_tokens
        return first, tokens

    done = await asyncio.gather(*(follow(h) for h in handles))
    end = time.perf_counter()
    await engine.close()
    return start, [f for f, _ in done], end, sum(t for _, t in done)


def burst(args: argparse.Namespace) -> None:
    longest, new = args.burst_longest, args.burst_new_tokens
    cli.use_compilation_cache()  # as the server: a second run loads its programs
    sampler = load_sampler(args.checkpoint, args.dtype, cache_length=2 * longest, prefill_chunk=args.prefill_chunk)
    pool = sampler.tokenizer.encode(TEXT * (4 * longest // len(TEXT.split()) + 4))
    lengths = np.linspace(16, longest, 32).round().astype(int)
    prompts = [pool[i : i + n] for i, n in enumerate(lengths)]
    print(f"\nburst: 32 requests at once, prompts {lengths[0]} to {lengths[-1]} tokens, 32 slots, {new} new tokens")

    engine = Engine(sampler, slots=32, decode_steps=args.decode_steps, max_prompt_tokens=longest)
    began, before = time.perf_counter(), compiles()
    engine.warmup()
    ready = compiles()
    print(f"start-up compiled {ready - before} programs in {time.perf_counter() - began:.0f} s")
    start, firsts, _, _ = asyncio.run(run_engine(engine, prompts, new))
    all_first = max(firsts) - start
    moved = compiles() - ready

    def batched() -> float:
        t = time.perf_counter()
        logits, cache = sampler.prefill(sampler.new_cache(32), prompts)
        state = sampler.start(logits, prompts, new, SamplingParams.create(32), 0)
        np.asarray(sampler.decode(cache, state, args.decode_steps)[2])
        return time.perf_counter() - t

    batched()  # compiles
    reference = batched()
    print("| all 32 first tokens s | one batched prefill + decode call s | ratio (<= 1.5) | compiles after ready (0) |")
    print("|---:|---:|---:|---:|")
    print(f"| {all_first:.2f} | {reference:.2f} | {all_first / reference:.2f}x | {moved} |", flush=True)

    rows = [pool[i : i + 48] for i in range(16)]
    engine = Engine(sampler, slots=16, decode_steps=args.decode_steps, max_prompt_tokens=64)
    engine.warmup()
    ready = compiles()
    _, firsts, end, tokens = asyncio.run(run_engine(engine, rows, args.max_tokens))
    served = (tokens - 16) / (end - max(firsts))
    moved = compiles() - ready

    def generate() -> float:
        logits, cache = sampler.prefill(sampler.new_cache(16), rows)
        state = jax.block_until_ready(sampler.start(logits, rows, args.max_tokens, SamplingParams.create(16), 0))
        t, decoded = time.perf_counter(), 0
        while not bool(np.all(np.asarray(state.done))):
            cache, state, out, _ = sampler.decode(cache, state, sampler.decode_steps)
            decoded += int((np.asarray(out) != NO_TOKEN).sum())
        return decoded / (time.perf_counter() - t)

    generate()  # compiles
    alone = generate()
    print(
        "\n| decode tok/s, 16 busy rows | Sampler.generate batch 16 tok/s | ratio (>= 0.9) | compiles after ready (0) |"
    )
    print("|---:|---:|---:|---:|")
    print(f"| {served:.1f} | {alone:.1f} | {served / alone:.2f}x | {moved} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="gemma_jax checkpoint, HF directory or hub id (default: the embedded 270M)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f32", "fp8"])
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--cache-length", type=int, default=2048)
    p.add_argument("--decode-steps", type=int, default=4)
    p.add_argument("--prefill-chunk", type=int, default=2048)
    p.add_argument("--scenarios", default="levels,burst", help="comma list of: levels, burst")
    p.add_argument("--concurrency", default="1,4,16", help="comma list of concurrent clients")
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--prompt-words", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per request (levels, and burst's decode)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (skips the sampler's vocabulary sort)")
    p.add_argument("--burst-longest", type=int, default=1024, help="the burst's longest prompt, in tokens")
    p.add_argument("--burst-new-tokens", type=int, default=8, help="new tokens per burst request")
    p.add_argument("server_args", nargs="*", help="more `python -m gemma_jax.serve` flags, after --")
    args = p.parse_args()
    scenarios = args.scenarios.split(",")
    if unknown := set(scenarios) - {"levels", "burst"}:
        p.error(f"unknown scenario(s) {sorted(unknown)}: choose from levels, burst")
    print(
        f"checkpoint {args.checkpoint or 'embedded 270M'}, {args.dtype}, {args.slots} slots x {args.cache_length} "
        f"tokens, {args.decode_steps} decode steps per call; {args.requests} requests per level, ~{args.prompt_words} "
        f"prompt words, <= {args.max_tokens} new tokens, T={args.temperature}; "
        f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs"
    )
    if "levels" in scenarios:
        levels(args)
    if "burst" in scenarios:
        burst(args)


if __name__ == "__main__":
    main()
