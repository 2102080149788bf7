"""SPPO training benchmark: LoRA vs full fine-tuning speed and memory, and the 9B memory plan.

    python benchmarks/sppo_train.py                 # CPU: small config, LoRA vs full; 9B plan (abstract)
    python benchmarks/sppo_train.py --gpu           # one GPU: LoRA steps/s on the 9B shape, random weights

CPU mode runs real train steps (RMSProp, remat, grad accumulation as in training) on a small config and
prints training tokens/s and the compiled step's memory (arguments + outputs + temporaries, XLA's
memory_analysis) for full fine-tuning and LoRA, with the ratio LoRA / full. The 9B plan counts the
train state from `jax.eval_shape` (nothing allocated): LoRA on one device, and full fine-tuning under
FSDP on 8 devices (per-device shards from `gemma_jax.sharding`), plus the logits of one micro-batch,
the largest activation.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import gemma_jax as gj
from gemma_jax.sppo import trainer

GiB = 1 << 30


def synthetic_batch(cfg: trainer.TrainConfig, vocab: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A full-length batch [A, 2b, T]: prompt = first quarter, response = the rest; reference log-probs given."""
    rng = np.random.default_rng(seed)
    a, b = cfg.grad_accum, cfg.micro_batch
    loss_mask = np.zeros((a, 2 * b, length), bool)
    loss_mask[..., length // 4 :] = True
    return {
        "tokens": rng.integers(3, vocab, (a, 2 * b, length)).astype(np.int32),
        "mask": np.ones((a, 2 * b, length), bool),
        "loss_mask": loss_mask,
        "probs": rng.uniform(0.1, 0.9, (a, b, 3)).astype(np.float32),
        "ref_logps": np.full((a, 2 * b), -float(length), np.float32),
    }


def tree_bytes(tree, per_device=None) -> int:
    """Bytes of a tree of ShapeDtypeStructs/arrays; with `per_device` (a sharding tree) the bytes of one shard."""
    leaves = jax.tree.leaves(tree)
    if per_device is None:
        return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves)
    shards = jax.tree.leaves(per_device)
    return sum(
        math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x, s in zip(leaves, shards, strict=True)
    )


def time_steps(model: gj.Transformer, cfg: trainer.TrainConfig, length: int, steps: int) -> dict:
    """Compile, warm up, then time `steps` train steps on one synthetic batch; the compiled step's memory too."""
    model.remat = cfg.remat
    graphdef, trainable, frozen = trainer.split_model(model, cfg)
    tx = trainer.make_optimizer(cfg, total_steps=1000)
    step = trainer.make_train_step(graphdef, tx, cfg)
    state = trainer.init_state(tx, trainable, cfg)
    batch = synthetic_batch(cfg, model.config.vocab_size, length)
    t0 = time.perf_counter()
    step = step.lower(state, frozen, None, batch).compile()  # compiled once, called directly below
    mem = step.memory_analysis()
    state, metrics = step(state, frozen, None, batch)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, frozen, None, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - t0) / steps
    return {
        "trainable": sum(x.size for x in jax.tree.leaves(trainable)),
        "tokens_per_s": batch["mask"].sum() / seconds,
        "step_s": seconds,
        "compile_and_first_s": first,
        "memory": mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes,
        "temp": mem.temp_size_in_bytes,
        "loss": float(metrics["loss"]),
    }


def plan_9b(micro_pairs: int, length: int, lora_rank: int) -> None:
    """Per-device train-state bytes for the 9B shape from eval_shape: LoRA on 1 device, full FSDP on 8."""
    from gemma_jax.sharding import abstract_mesh, param_shardings

    config = gj.gemma2_9b()
    rows = 2 * micro_pairs
    logits = rows * length * config.vocab_size * 4  # float32 logits of one micro-batch
    print(
        f"\n9B plan (eval_shape; micro-batch {micro_pairs} pair(s) = {rows} rows x {length} tokens, split over devices)"
    )
    print(f"  logits of one micro-batch (float32): {logits / GiB:.2f} GiB; ~3x that is live in the loss backward")

    for name, cfg, devices in (
        (f"LoRA r={lora_rank} on all projections, bf16 base, 1 device",
         trainer.TrainConfig(lora_rank=lora_rank, lora_targets=("all",)), 1),
        ("full, float32 master weights, FSDP over 8 devices", trainer.TrainConfig(), 8),
        ("full, bf16 weights + float32 optimizer state, FSDP over 8", trainer.TrainConfig(param_dtype="bfloat16"), 8),
    ):  # fmt: skip

        def build(cfg=cfg):
            model = gj.Transformer(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
            _, trainable, frozen = trainer.split_model(model, cfg)
            return frozen, trainer.init_state(trainer.make_optimizer(cfg, 310), trainable, cfg)

        frozen, state = jax.eval_shape(build)
        mesh = abstract_mesh("fsdp", devices)

        def per_device(tree: nnx.State, mesh=mesh) -> int:
            return tree_bytes(tree, param_shardings(tree, mesh)) if jax.tree.leaves(tree) else 0

        params = per_device(state["params"])
        moments = jax.tree.leaves(state["opt_state"], is_leaf=lambda x: isinstance(x, nnx.State))
        opt = sum(per_device(x) for x in moments if isinstance(x, nnx.State))  # rmsprop nu, sharded like params
        grads = params // jnp.dtype(cfg.param_dtype).itemsize * (4 + jnp.dtype(cfg.param_dtype).itemsize)
        acts = 3 * logits / devices
        total = per_device(frozen) + params + opt + grads + acts
        print(
            f"  {name}:\n    frozen {per_device(frozen) / GiB:.2f} + trainable {params / GiB:.2f} "
            f"+ optimizer {opt / GiB:.2f} + gradients (step + f32 accumulator) {grads / GiB:.2f} "
            f"+ logits {acts / GiB:.2f} = {total / GiB:.1f} GiB per device"
        )


def bench_gpu(config: gj.GemmaConfig, length: int, lora_rank: int, steps: int) -> None:
    """LoRA train steps/s on `config` (the 9B shape) with random bf16 weights on one accelerator."""
    cfg = trainer.TrainConfig(lora_rank=lora_rank, lora_targets=("all",), batch_size=1, grad_accum=1)

    @jax.jit
    def init():
        model = gj.Transformer(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        return gj.params_of(model)

    model = gj.from_params(config, init(), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    r = time_steps(model, cfg, length, steps)
    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / GiB
    print(
        f"{config.num_layers}-layer D={config.hidden_size} LoRA r={lora_rank} on {jax.devices()[0].device_kind}: "
        f"{1 / r['step_s']:.2f} steps/s ({r['tokens_per_s']:.0f} tokens/s, 1 pair x {length} tokens), "
        f"compile + first step {r['compile_and_first_s']:.1f} s, peak {peak:.1f} GiB, "
        f"compiled step {r['memory'] / GiB:.1f} GiB, loss {r['loss']:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="LoRA steps/s on the 9B shape (needs one large accelerator)")
    parser.add_argument("--length", type=int, default=128, help="tokens per row (CPU mode); --gpu uses 1024")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--preset", default="gemma2_9b", help="--gpu model shape (gemma2_tiny to try the script)")
    args = parser.parse_args()
    if args.gpu:
        bench_gpu(gj.preset(args.preset), length=1024, lora_rank=args.lora_rank, steps=args.steps)
        return

    config = gj.gemma2_tiny(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_layers=4, head_dim=64)
    base = trainer.TrainConfig(batch_size=4, grad_accum=2, learning_rate=1e-5)
    print(f"backend {jax.default_backend()}; config: {config.num_layers} layers, D={config.hidden_size}, "
          f"V={config.vocab_size}; 4 pairs/step (2 micro-batches) x {args.length} tokens, remat on")  # fmt: skip
    results = {}
    for name, cfg in (("full", base), ("lora", dataclasses.replace(base, lora_rank=args.lora_rank))):
        model = gj.Transformer(config, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
        r = results[name] = time_steps(model, cfg, args.length, args.steps)
        print(
            f"  {name:4s}: {r['trainable']:>10,d} trainable  {r['tokens_per_s']:>8.0f} tokens/s  "
            f"step {r['step_s'] * 1e3:.0f} ms  "
            f"step memory {r['memory'] / 2**20:.1f} MiB (temporaries {r['temp'] / 2**20:.1f} MiB)"
        )
    full, lora = results["full"], results["lora"]
    print(
        f"  LoRA / full: tokens/s x{lora['tokens_per_s'] / full['tokens_per_s']:.2f}, "
        f"step memory x{lora['memory'] / full['memory']:.2f}"
    )
    plan_9b(micro_pairs=4, length=1024, lora_rank=args.lora_rank)


if __name__ == "__main__":
    main()
