"""`python -m gemma_jax.serve`: an OpenAI-compatible HTTP server with continuous batching.

--checkpoint takes a gemma_jax checkpoint, an HF checkpoint directory or a hub id (HF sources are
converted once into the cache and reused); without it the embedded Gemma 3 270M is served, as
`python -m gemma_jax.sample` runs it. A base model (like that one) answers /v1/completions; its
/v1/chat/completions refuses with a 400 unless --chat forces the template. The server compiles its
programs before it opens the port; Ctrl-C or SIGTERM stops taking requests and finishes the ones in
flight (a second Ctrl-C quits at once).
"""

from __future__ import annotations

import argparse
import logging
import pathlib

import jax
import jax.numpy as jnp

from gemma_jax import checkpoint, cli, default_model, fp8, sharding
from gemma_jax.checkpoint_errors import CheckpointError
from gemma_jax.config import ConfigError
from gemma_jax.kv_cache import CACHE_DTYPES
from gemma_jax.sampler import Sampler
from gemma_jax.serve import policy, server
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
    p = argparse.ArgumentParser(
        prog="python -m gemma_jax.serve", description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter
    )
    p.add_argument(
        "--checkpoint",
        help="gemma_jax checkpoint, HF checkpoint directory or hub id (default: the embedded Gemma 3 270M, a base "
        f"model, served as '{default_model.NAME}')",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--slots",
        type=_positive,
        help="decode slots: requests generated at once (default: 16; 4 for the embedded model, sized for a CPU)",
    )
    p.add_argument(
        "--cache-length",
        type=_positive,
        help="context per slot: prompt + completion (default: 16384; 2048 for the embedded model)",
    )
    p.add_argument(
        "--dtype",
        type=lambda s: _ALIASES.get(s, s),
        choices=sorted(DTYPES),
        help="bf16; f32; fp8 / int8: projections in e4m3 / int8 (an 8-bit checkpoint as stored, a float one "
        "quantized at load) (default: bf16; f32 for the embedded model and on CPU, as the sampler runs it)",
    )
    p.add_argument(
        "--quant",
        choices=fp8.MODES,
        default=fp8.WEIGHT_ONLY,
        help="8-bit compute mode with --dtype fp8 or int8 (see fp8.py)",
    )
    p.add_argument(
        "--cache-dtype",
        choices=list(CACHE_DTYPES),
        help="KV cache storage (default: the compute dtype; float32 on CPU); fp8 / int8: 8-bit keys and values with a "
        "float32 scale per token and kv head, half a bf16 cache: twice the slots or context in the same memory",
    )
    p.add_argument("--max-queue", type=_non_negative, default=128, help="requests that may wait for a slot; then 429")
    p.add_argument(
        "--decode-steps", type=_positive, default=4, help="decode steps per jit call: new requests join between calls"
    )
    p.add_argument("--prefill-chunk", type=_positive, default=2048, help="longest prompt piece prefilled at once")
    p.add_argument(
        "--admission-tokens",
        type=_positive,
        default=16384,
        help="padded prompt tokens prefilled together when waiting requests join the batch: bounds that call's "
        "memory and the programs compiled at start-up; more requests join with the next call",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the `model` clients send, listed by /v1/models (default: --checkpoint as given; its directory's name "
        "is accepted too)",
    )
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="serve /v1/chat/completions with the Gemma chat template (default: when the checkpoint is "
        "instruction-tuned; a base model's chat requests get a 400 that points to /v1/completions)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where converted checkpoints are kept (default: $GEMMA_JAX_CACHE, else ~/.cache/gemma_jax)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=None,
        help="seconds to finish in-flight requests on shutdown, then they end with an error (default: no limit)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    policy.add_cli_args(p)
    sharding.add_cli_args(p, serving=True)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sharding.maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    if jax.process_count() > 1:
        parser.exit(2, f"{parser.prog}: error: serving runs on one host; shard over its devices with --mesh\n")
    mesh = sharding.make_mesh(args.mesh) if args.mesh else None
    if mesh is not None and mesh.shape["fsdp"] > 1:
        logging.getLogger(__name__).warning(
            "--mesh %s: fsdp all-gathers every weight on every decode step; serve with tensor parallelism "
            "(--mesh alone: tensor over all devices)",
            args.mesh,
        )
    embedded = args.checkpoint is None  # the CPU demo: served as the sampler runs it, in float32, sized for a CPU
    args.dtype = args.dtype or _ALIASES[cli.default_dtype(embedded)]
    args.slots = args.slots or (4 if embedded else 16)
    args.cache_length = args.cache_length or (2048 if embedded else 16384)
    cli.use_compilation_cache(args.cache_dir)
    try:
        sampler = load_sampler(
            args.checkpoint,
            args.dtype,
            cache_length=args.cache_length,
            prefill_chunk=args.prefill_chunk,
            quant=args.quant,
            chat=args.chat,
            mesh=mesh,
            cache_dir=args.cache_dir,
            cache_dtype=args.cache_dtype,
        )
        sizes = ("slots", "decode_steps", "max_queue", "max_prompt_tokens", "admission_tokens")
        engine = Engine(sampler, **{name: getattr(args, name) for name in sizes})
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    logging.getLogger(__name__).info(
        "compiling: %d slots x %d tokens of context, %s", args.slots, args.cache_length, args.dtype
    )
    engine.warmup()
    names = served_names(args.checkpoint, args.served_model_name)
    app = create_app(engine, model_name=names[0], aliases=names[1:], policy=policy.from_args(args))
    return server.run(
        server.make_server(
            app, engine, host=args.host, port=args.port, drain_timeout=args.drain_timeout, log_level=args.log_level
        )
    )


def load_sampler(
    source: str | None,
    dtype: str,
    *,
    cache_length: int,
    prefill_chunk: int = 2048,
    quant: str = fp8.WEIGHT_ONLY,
    chat: bool | None = None,
    mesh: jax.sharding.Mesh | None = None,
    cache_dir: str | None = None,
    cache_dtype: str | None = None,
) -> Sampler:
    """The Sampler the server runs (benchmarks/serve.py measures against the same): `source` as --checkpoint
    (None: the embedded model; HF sources converted once), loaded in `dtype` (a DTYPES key), over `mesh`, with a
    KV cache of `cache_dtype` (a CACHE_DTYPES key; None: the compute dtype's)."""
    storage, compute = DTYPES[dtype]
    path = cli.resolve_checkpoint(source, cache_dir=cache_dir, dtype=storage)
    quantized = storage in fp8.STORAGES
    model = checkpoint.load_model(
        path, dtype=compute, mesh=mesh, quant=quant if quantized else None, storage=storage if quantized else None
    )
    tokenizer = Tokenizer.from_dir(path, instruction_tuned=chat)
    cache = dict(cache_length=cache_length, prefill_chunk=prefill_chunk, cache_dtype=cache_dtype)
    return Sampler(model, tokenizer, mesh=mesh, **cache)


def served_names(source: str | None, served_model_name: str | None = None) -> list[str]:
    """The `model` names the server answers to, the one /v1/models lists first: --served-model-name, else
    --checkpoint as given (a hub id, a path as typed), else the default model's name; a local checkpoint's
    directory name is accepted too, so a client that sends either gets the model."""
    names = [served_model_name or source or default_model.NAME]
    if source:
        names.append(source)
        local = pathlib.Path(source).expanduser()
        if local.exists():
            names.append(local.resolve().name)
    return list(dict.fromkeys(names))


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
