"""`python -m gemma_jax.sample`: complete prompts with a checkpoint, or run it interactively.

--checkpoint takes a gemma_jax checkpoint, an HF checkpoint directory or a hub id; HF sources are
converted once into the cache ($GEMMA_JAX_CACHE or ~/.cache/gemma_jax) and reused. Without it, the
embedded Gemma 3 270M (the `demo` extra, `gemma_jax.default_model`) runs, offline: a base model, good
at continuing text, not at chat. Each --prompt adds a row to one batch; without --prompt an interactive
loop runs: a chat with history for an instruction-tuned checkpoint, else each line is completed on its own.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Callable

from gemma_jax import checkpoint, cli, fp8, sampling, sharding
from gemma_jax.checkpoint_errors import CheckpointError
from gemma_jax.config import ConfigError
from gemma_jax.kv_cache import CACHE_DTYPES
from gemma_jax.sampler import Sampler
from gemma_jax.tokenizer import Tokenizer

# Defaults sized for a laptop CPU, where the embedded model decodes a few tokens a second; raise them on an accelerator.
MAX_NEW_TOKENS = 64
CACHE_LENGTH = 4096
COMPLETION_BANNER = (
    "Base model: each line you type is continued as plain text, with no chat history "
    "(--chat forces the chat template). Ctrl-D or /exit quits.\n"
)
CHAT_BANNER = "Chat with the model. /reset clears the history, Ctrl-D (or /exit) quits.\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gemma_jax.sample", description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter
    )
    p.add_argument(
        "--checkpoint",
        help="gemma_jax checkpoint, HF checkpoint directory or hub id (default: the embedded Gemma 3 270M, a base "
        "model)",
    )
    p.add_argument("--prompt", action="append", help="prompt text; repeat for a batch (none: an interactive loop)")
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap prompts in the Gemma chat template, and chat with history in the interactive loop (default: on "
        "when the checkpoint is instruction-tuned: a chat template in its tokenizer files or GGUF, or '-it' in its "
        "name; off for a base model, which continues text)",
    )
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="tokens generated per prompt at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (unused when greedy)")
    p.add_argument(
        "--cache-length", type=int, default=CACHE_LENGTH, help="KV cache tokens per sequence (prompt + output)"
    )
    p.add_argument(
        "--dtype",
        choices=sorted(checkpoint.DTYPES),
        help="compute and cache dtype (default: bfloat16; float32 for the embedded model and on CPU); fp8 / int8: "
        "e4m3 / int8 projection weights with per-channel scales, bf16 compute (HF sources convert to that "
        "storage, float gemma_jax checkpoints are quantized at load)",
    )
    p.add_argument(
        "--quant",
        choices=fp8.MODES,
        help="8-bit projections: weight_only (the default with --dtype fp8 or int8) or w8a8 (native FP8 matmuls on "
        "NVIDIA sm_89+, int8 ones on TPU; elsewhere it falls back to weight_only with a warning)",
    )
    p.add_argument(
        "--cache-dtype",
        choices=list(CACHE_DTYPES),
        help="KV cache storage (default: the compute dtype; float32 on CPU); fp8 / int8: 8-bit keys and values with a "
        "float32 scale per token and kv head, half a bf16 cache",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where converted checkpoints are kept (default: $GEMMA_JAX_CACHE, else ~/.cache/gemma_jax)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per prompt: text, token_ids, finish_reason")
    sharding.add_cli_args(p)
    return p


def main(argv: list[str] | None = None, *, input_fn: Callable[[str], str] = input) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        sampling.check(args.temperature, args.top_k, args.top_p, args.min_p)
        if args.max_new_tokens < 1 or args.cache_length < 1:
            raise ValueError("--max-new-tokens and --cache-length must be positive")
    except ValueError as e:
        parser.error(str(e))
    sharding.maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    args.dtype = args.dtype or cli.default_dtype(embedded=not args.checkpoint)
    mesh = sharding.make_mesh(args.mesh) if args.mesh else None
    cli.use_compilation_cache(args.cache_dir)
    try:
        path = cli.resolve_checkpoint(args.checkpoint, cache_dir=args.cache_dir, dtype=args.dtype)
        storage = args.dtype if args.dtype in fp8.STORAGES else None
        model = checkpoint.load_model(
            path, dtype=checkpoint.DTYPES[args.dtype], mesh=mesh, quant=args.quant, storage=storage
        )
        tokenizer = Tokenizer.from_dir(path, instruction_tuned=args.chat or None)  # --chat: no base-model warning
        sampler = Sampler(model, tokenizer, cache_length=args.cache_length, cache_dtype=args.cache_dtype, mesh=mesh)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    chat = args.chat if args.chat is not None else tokenizer.instruction_tuned
    settings = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
    )
    out = sys.stdout if sharding.is_primary_host() else io.StringIO()  # other hosts compute, print nothing
    try:
        if args.prompt:
            complete(sampler, args.prompt, chat=chat, as_json=args.json, out=out, **settings)
        else:
            repl(sampler, chat=chat, input_fn=input_fn, out=out, **settings)
    except ValueError as e:  # a prompt that does not fit: checked before anything compiles
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, "\ninterrupted\n")
    return 0


def complete(sampler: Sampler, prompts: list[str], *, chat: bool, as_json: bool, out, **settings) -> None:
    """A batch of prompts: JSON lines, or the text (streamed when there is one prompt)."""
    if len(prompts) == 1 and not as_json:
        for piece in sampler.stream(prompts[0], chat=chat, **settings):
            out.write(piece)
            out.flush()
        out.write("\n")
        return
    for i, (prompt, c) in enumerate(zip(prompts, sampler.generate(prompts, chat=chat, **settings), strict=True)):
        if as_json:
            row = {"prompt": prompt, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            out.write(f"--- {i}: {prompt}\n{c.text}\n")


def repl(sampler: Sampler, *, chat: bool, input_fn: Callable[[str], str], out, seed: int, **settings) -> None:
    """Read a line, stream the model's answer. `chat`: a conversation kept as history (/reset clears it);
    otherwise each line is a prompt completed on its own, what a base model is good at. Ctrl-D or /exit ends."""
    out.write(CHAT_BANNER if chat else COMPLETION_BANNER)
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input_fn("> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        if line == "/exit":
            return
        if line == "/reset":
            history.clear()
            out.write("History cleared.\n" if chat else "Nothing to clear: each line is completed on its own.\n")
            continue
        if not line:
            continue
        if chat:
            history.append({"role": "user", "content": line})
        prompt = sampler.tokenizer.encode_chat(history) if chat else line
        reply = []
        try:
            for piece in sampler.stream(prompt, seed=seed + len(history), **settings):
                out.write(piece)
                out.flush()
                reply.append(piece)
        except ValueError as e:  # the conversation outgrew the cache
            if chat:
                history.pop()
            out.write(f"error: {e}\n")
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the loop; the part shown stays in the history
            out.write(" [interrupted]")
        out.write("\n")
        if chat:
            history.append({"role": "assistant", "content": "".join(reply)})


if __name__ == "__main__":
    sys.exit(main())
