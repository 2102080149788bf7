"""`python -m gemma_jax.serve`: an OpenAI-compatible HTTP server with continuous batching.

--checkpoint takes a gemma_jax checkpoint, an HF checkpoint directory or a hub id (HF sources are
converted once into the cache and reused). The server compiles its programs before it opens the
port; Ctrl-C or SIGTERM stops taking requests and finishes the ones in flight (a second Ctrl-C
quits at once).
"""

from __future__ import annotations

import argparse
import logging
import pathlib

import jax
import jax.numpy as jnp
import uvicorn

from gemma_jax import checkpoint, fp8, sharding
from gemma_jax.checkpoint_errors import CheckpointError
from gemma_jax.config import ConfigError
from gemma_jax.sampler import Sampler
from gemma_jax.serve.app import create_app
from gemma_jax.serve.engine import Engine
from gemma_jax.tokenizer import Tokenizer

# --dtype: (checkpoint storage dtype when converting an HF source, compute dtype)
DTYPES = {
    "bf16": ("bfloat16", jnp.bfloat16),
    "f32": ("float32", jnp.float32),
    "fp8": ("fp8", jnp.bfloat16),
    "int8": ("int8", jnp.bfloat16),
}
_ALIASES = {"bfloat16": "bf16", "float32": "f32"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gemma_jax.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="gemma_jax checkpoint, HF checkpoint directory or hub id")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--slots", type=_positive, default=16, help="decode slots: requests generated at once")
    p.add_argument("--cache-length", type=_positive, default=16384, help="context per slot: prompt + completion")
    p.add_argument(
        "--dtype",
        type=lambda s: _ALIASES.get(s, s),
        choices=sorted(DTYPES),
        default="bf16",
        help="bf16; f32; fp8 / int8: projections in e4m3 / int8 (an 8-bit checkpoint as stored, a float one "
        "quantized at load)",
    )
    p.add_argument(
        "--quant",
        choices=fp8.MODES,
        default=fp8.WEIGHT_ONLY,
        help="8-bit compute mode with --dtype fp8 or int8 (see fp8.py)",
    )
    p.add_argument("--max-queue", type=_non_negative, default=128, help="requests that may wait for a slot; then 429")
    p.add_argument(
        "--decode-steps", type=_positive, default=4, help="decode steps per jit call: new requests join between calls"
    )
    p.add_argument("--prefill-chunk", type=_positive, default=2048, help="longest prompt piece prefilled at once")
    p.add_argument("--served-model-name", default=None, help="the `model` clients send (default: from --checkpoint)")
    p.add_argument("--cache-dir", default=None, help="where converted HF checkpoints are kept")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=None,
        help="seconds to finish in-flight requests on shutdown (default: all)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sharding.add_cli_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sharding.maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    if jax.process_count() > 1:
        parser.exit(2, f"{parser.prog}: error: serving runs on one host; shard over its devices with --mesh\n")
    mesh = sharding.make_mesh(args.mesh) if args.mesh else None
    storage, compute = DTYPES[args.dtype]
    try:
        path = checkpoint.resolve(args.checkpoint, cache_dir=args.cache_dir, dtype=storage)
        quantized = storage in fp8.STORAGES
        model = checkpoint.load_model(
            path,
            dtype=compute,
            mesh=mesh,
            quant=args.quant if quantized else None,
            storage=storage if quantized else None,
        )
        tokenizer = Tokenizer.from_dir(path)
        sampler = Sampler(model, tokenizer, cache_length=args.cache_length, prefill_chunk=args.prefill_chunk, mesh=mesh)
        engine = Engine(sampler, slots=args.slots, decode_steps=args.decode_steps, max_queue=args.max_queue)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    logging.getLogger(__name__).info(
        "compiling: %d slots x %d tokens of context, %s", args.slots, args.cache_length, args.dtype
    )
    engine.warmup()
    name = args.served_model_name or _model_name(args.checkpoint)
    app = create_app(engine, model_name=name)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.drain_timeout,
    )
    return 0


def _model_name(source: str) -> str:
    """A hub id as given; a local directory by its name."""
    path = pathlib.Path(source).expanduser()
    return path.resolve().name if path.exists() else source


def _positive(s: str) -> int:
    value = int(s)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return value


def _non_negative(s: str) -> int:
    value = int(s)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return value


if __name__ == "__main__":
    raise SystemExit(main())
