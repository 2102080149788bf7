"""Serving benchmark: `python -m gemma_jax.serve` under 1, 4 and 16 concurrent clients, on 127.0.0.1.

Starts the server on a free local port (its compile happens before the port opens), then for each
concurrency level runs that many clients, each sending streaming completions back to back until
--requests have been sent. Request i always has the same prompt and seed, so every level generates
the same tokens. Prints, per level: output tokens/s of the whole server and its ratio to one client
(the baseline, measured in the same run), median and p99 time to first token (TTFT), median and p99
inter-token latency (ITL: the gap between streamed chunks; a chunk holds up to --decode-steps tokens)
and the median time per output token of a request (TPOT = (latency - TTFT) / (tokens - 1)).

    python benchmarks/serve.py --checkpoint PATH_OR_HUB_ID [--dtype fp8] [--slots 16] [--cache-length 16384]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import jax
import numpy as np
import openai

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
        await one(client, 0, args)  # compiles the prompt's prefill bucket; not timed
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
    command = [sys.executable, "-m", "gemma_jax.serve", "--checkpoint", args.checkpoint, "--host", HOST]
    command += ["--port", str(port), "--served-model-name", MODEL, "--dtype", args.dtype, "--log-level", "warning"]
    command += ["--slots", str(args.slots), "--cache-length", str(args.cache_length)]
    command += ["--decode-steps", str(args.decode_steps), *args.server_args]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="gemma_jax checkpoint, HF directory or hub id")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f32", "fp8"])
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--cache-length", type=int, default=2048)
    p.add_argument("--decode-steps", type=int, default=4)
    p.add_argument("--concurrency", default="1,4,16", help="comma list of concurrent clients")
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--prompt-words", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (skips the sampler's vocabulary sort)")
    p.add_argument("server_args", nargs="*", help="more `python -m gemma_jax.serve` flags, after --")
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    print(
        f"checkpoint {args.checkpoint}, {args.dtype}, {args.slots} slots x {args.cache_length} tokens, "
        f"{args.decode_steps} decode steps per call; {args.requests} requests per level, ~{args.prompt_words} "
        f"prompt words, <= {args.max_tokens} new tokens, T={args.temperature}; "
        f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs"
    )
    with server(args) as url:
        header = f"| clients | requests | out tok/req | out tok/s | vs {levels[0]} | TTFT p50 ms | TTFT p99 ms "
        print(header + "| ITL p50 ms | ITL p99 ms | TPOT p50 ms |")
        print("|---" * 10 + "|")
        baseline = None
        for clients in levels:
            results, wall = asyncio.run(level(url, clients, args))
            line, throughput = row(clients, results, wall, baseline)
            baseline = baseline or throughput
            print(line, flush=True)


if __name__ == "__main__":
    main()
