"""python -m gemma_jax.sppo {generate, score, train, iterate}: the SPPO recipe from the command line.

  generate  prompts -> samples.jsonl (K responses per prompt from the policy)
  score     samples -> train.parquet|jsonl (chosen, rejected, chosen_probs, chosen_probs_win, chosen_probs_lose)
  train     policy + scored pairs -> RUN_DIR/checkpoint (resumable: rerun the same command)
  iterate   generate -> score -> train, N times; iteration t starts from and references iteration t-1's model
Models are gemma_jax checkpoints, HF directories or hub ids (converted once, see checkpoint.resolve).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib
import sys

import jax
import jax.numpy as jnp

from gemma_jax import checkpoint, sharding
from gemma_jax.sampler import Sampler
from gemma_jax.sppo import lora
from gemma_jax.sppo.data import check_pairs, load_prompts, read_rows, require_columns, write_rows
from gemma_jax.sppo.judge import JudgeScorer
from gemma_jax.sppo.preference import PairRMScorer, RewardScorer, Scorer, reward_from_spec
from gemma_jax.sppo.selfplay import sample_responses, score_samples
from gemma_jax.sppo.trainer import TrainConfig, train
from gemma_jax.tokenizer import Tokenizer
from gemma_jax.transformer import params_of

log = logging.getLogger("gemma_jax.sppo")


def _load(model: str, dtype: str, mesh=None):
    path = checkpoint.resolve(model)
    return path, checkpoint.load_model(path, dtype=jnp.dtype(dtype), mesh=mesh), Tokenizer.from_dir(path)


def make_scorer(spec: str, dtype: str = "bfloat16") -> Scorer:
    """'reward:pkg.module:fn' | 'judge:CHECKPOINT' | 'pairrm[:RANKER]' -> a scorer."""
    kind, _, arg = spec.partition(":")
    if kind == "reward":
        return RewardScorer(reward_from_spec(arg))
    if kind == "judge":
        if not arg:
            raise ValueError("--scorer judge:CHECKPOINT needs the judge model's checkpoint")
        _, model, tokenizer = _load(arg, dtype)
        return JudgeScorer(model, tokenizer)
    if kind == "pairrm":
        return PairRMScorer(arg or "llm-blender/PairRM")
    raise ValueError(f"unknown scorer {spec!r}; use reward:pkg.module:fn, judge:CHECKPOINT or pairrm")


# ---------------------------------------------------------------- steps


def _mesh(args: argparse.Namespace) -> jax.sharding.Mesh | None:
    return sharding.mesh_from_args(args) if args.mesh else None


def generate(args: argparse.Namespace, model_dir: str, prompts: list[str], out: pathlib.Path) -> pathlib.Path:
    mesh = _mesh(args)
    _, model, tokenizer = _load(model_dir, args.dtype, mesh)
    sampler = Sampler(model, tokenizer, cache_length=args.cache_length, mesh=mesh)
    rows = sample_responses(
        sampler,
        prompts,
        k=args.k,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=args.gen_batch_size,
    )
    return write_rows(out, rows)


def score(
    args: argparse.Namespace, samples: pathlib.Path, out: pathlib.Path, tokenizer_dir: str | None
) -> pathlib.Path:
    if args.reference_compat and not tokenizer_dir:
        raise ValueError("--reference-compat shows the scorer the templated prompt: pass --tokenizer CHECKPOINT")
    rows = read_rows(samples)
    require_columns(rows, ["prompt", "responses"], str(samples))
    tokenizer = Tokenizer.from_dir(checkpoint.resolve(tokenizer_dir)) if tokenizer_dir else None
    scored = score_samples(
        rows, make_scorer(args.scorer, args.dtype), tokenizer=tokenizer, reference_compat=args.reference_compat
    )
    return write_rows(out, scored)


def train_step(args: argparse.Namespace, model_dir: str, data: pathlib.Path, run_dir: pathlib.Path) -> pathlib.Path:
    cfg = train_config(args)
    rows = read_rows(data)
    check_pairs(rows, str(data))  # a bad row fails before the model loads
    mesh = _mesh(args)
    path, model, tokenizer = _load(model_dir, args.dtype, mesh)
    result = train(model, tokenizer, rows, run_dir, cfg, source=str(data), mesh=mesh)
    out = checkpoint.save(
        run_dir / "checkpoint",
        model.config,
        params_of(result.model),
        dtype=args.save_dtype,
        tokenizer_dir=path,
        source=f"sppo({path})",
        overwrite=True,
    )
    log.info("wrote %s", out)
    return out


def train_config(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if "lora_targets" in values:
        values["lora_targets"] = tuple(t for t in values["lora_targets"].split(",") if t)
        lora.resolve_targets(values["lora_targets"])  # a bad name fails before any loading
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


def iterate(args: argparse.Namespace) -> pathlib.Path:
    """N rounds of generate -> score -> train; finished steps of an interrupted run are reused."""
    train_config(args)
    sources = args.prompts
    if len(sources) not in (1, args.iterations):
        raise ValueError(f"give one prompt source, or one per iteration ({args.iterations}); got {len(sources)}")
    prompt_sets = [load_prompts(s, column=args.prompt_column, split=args.split, limit=args.limit) for s in sources]
    if len(prompt_sets) == 1:
        every = prompt_sets[0]
        prompt_sets = [every[t :: args.iterations] for t in range(args.iterations)]  # disjoint parts
    model_dir, out = args.model, pathlib.Path(args.out)
    for t, prompts in enumerate(prompt_sets, start=1):
        step_dir = out / f"iter{t}"
        samples, data, run_dir = step_dir / "samples.jsonl", step_dir / f"train.{args.format}", step_dir / "run"
        if not samples.is_file():
            generate(args, model_dir, prompts, samples)
        if not data.is_file():
            score(args, samples, data, model_dir if args.reference_compat else None)
        final = run_dir / "checkpoint"
        if not checkpoint.is_checkpoint(final):
            train_step(args, model_dir, data, run_dir)
        log.info("iteration %d done: %s", t, final)
        model_dir = str(final)
    return pathlib.Path(model_dir)


# ---------------------------------------------------------------- arguments


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("self-play sampling (reference: K=5, T=0.7, top-p 0.9, 2048 tokens)")
    g.add_argument("--k", type=int, default=5, help="samples per prompt (>= 2)")
    g.add_argument("--max-new-tokens", type=int, default=2048)
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--seed", type=int, default=0, help="pass k (sample k of each prompt) uses seed + 50 k")
    g.add_argument("--gen-batch-size", type=int, default=64, help="prompts per sampler call")
    g.add_argument("--cache-length", type=int, default=4096, help="KV cache per row: prompt + max_new_tokens")


def _add_prompt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-column", default="prompt")
    p.add_argument("--split", default="train", help="split of an HF dataset id")
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts")


def _add_score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scorer", required=True, help="reward:pkg.module:fn | judge:CHECKPOINT | pairrm[:RANKER]")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    g = p.add_argument_group("training (defaults: the released Gemma-2-9B-It SPPO runs)")
    g.add_argument("--loss-type", dest="loss_type", choices=["sppo", "sppo_single", "sppo_hard"], default=None)
    g.add_argument("--beta", type=float, default=None, help=f"eta = 1/beta (default {d.beta})")
    g.add_argument(
        "--learning-rate", "--lr", dest="learning_rate", type=float, default=None, help=f"default {d.learning_rate}"
    )
    g.add_argument("--warmup-ratio", dest="warmup_ratio", type=float, default=None)
    g.add_argument(
        "--batch-size", dest="batch_size", type=int, default=None, help=f"pairs per step (default {d.batch_size})"
    )
    g.add_argument("--grad-accum", dest="grad_accum", type=int, default=None, help=f"default {d.grad_accum}")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--max-steps", dest="max_steps", type=int, default=None)
    g.add_argument("--max-length", dest="max_length", type=int, default=None, help=f"default {d.max_length}")
    g.add_argument("--max-prompt-length", dest="max_prompt_length", type=int, default=None)
    g.add_argument("--param-dtype", dest="param_dtype", choices=["float32", "bfloat16"], default=None)
    g.add_argument("--opt-dtype", dest="opt_dtype", choices=["float32", "bfloat16"], default=None)
    g.add_argument("--no-remat", dest="remat", action="store_false", default=None)
    g.add_argument("--lora-rank", dest="lora_rank", type=int, default=None, help="0 = full fine-tuning (default)")
    g.add_argument("--lora-alpha", dest="lora_alpha", type=float, default=None)
    g.add_argument("--lora-targets", dest="lora_targets", default=None, help="comma list of q,k,v,o,gate,up,down|all")
    g.add_argument("--reference-on-the-fly", dest="reference_on_the_fly", action="store_true", default=None)
    g.add_argument("--save-every", dest="save_every", type=int, default=None)
    g.add_argument("--data-seed", dest="seed", type=int, default=None, help=f"data order (default {d.seed})")
    g.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float32"], help="output checkpoint dtype")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument(
        "--reference-compat",
        dest="reference_compat",
        action="store_true",
        default=None,
        help="reproduce the reference's double BOS, scored '<start_of_turn>model' header and templated PairRM prompt",
    )
    sharding.add_cli_args(p)  # --mesh: generation and training shard the policy the same way


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m gemma_jax.sppo", description=__doc__.split("\n")[0])
    sub = root.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="K samples per prompt from the policy")
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True, help=".jsonl/.parquet file or HF dataset id")
    p.add_argument("--out", required=True, help="samples .jsonl or .parquet")
    _add_prompt_args(p)
    _add_generate_args(p)
    _add_common(p)

    p = sub.add_parser("score", help="scored pairs in the reference's columns")
    p.add_argument("--samples", required=True)
    p.add_argument("--out", required=True, help="train .parquet or .jsonl")
    p.add_argument(
        "--tokenizer", default=None, help="checkpoint whose tokenizer templates prompts (--reference-compat)"
    )
    _add_score_args(p)
    _add_common(p)

    p = sub.add_parser("train", help="one SPPO iteration of training")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="run directory (state/, metrics.jsonl, checkpoint/)")
    _add_train_args(p)
    _add_common(p)

    p = sub.add_parser("iterate", help="generate -> score -> train, N iterations")
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True, nargs="+", help="one source, split N ways, or one per iteration")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=["parquet", "jsonl"], default="parquet")
    _add_prompt_args(p)
    _add_generate_args(p)
    _add_score_args(p)
    _add_train_args(p)
    _add_common(p)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            prompts = load_prompts(args.prompts, column=args.prompt_column, split=args.split, limit=args.limit)
            generate(args, args.model, prompts, pathlib.Path(args.out))
        elif args.command == "score":
            score(args, pathlib.Path(args.samples), pathlib.Path(args.out), args.tokenizer)
        elif args.command == "train":
            train_config(args)
            train_step(args, args.model, pathlib.Path(args.data), pathlib.Path(args.out))
        else:
            iterate(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
