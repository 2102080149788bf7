"""One SPPO iteration of training: pi_{t+1} from pi_t on the scored pairs, with pi_t as the frozen reference.

The recipe of the released Gemma-2-9B-It-SPPO runs (spec section 3): RMSProp as torch's (decay 0.99,
eps outside the sqrt, zero-initialised), global-norm clip 1.0, linear warmup over 10% of the steps
then linear decay to 0, lr 5e-7, one epoch, gradient accumulation. Full fine-tuning or LoRA; remat
per scanned layer group; trainable weights in `param_dtype` with the optimizer state in `opt_dtype`.

Reference log-probs are computed once before the first step and stored in the run directory (they
depend only on pi_t and the data), unless `reference_on_the_fly`. The train state and the data
position are saved with an Orbax CheckpointManager; a run killed at any step resumes from the last
save and replays exactly the same batches, so its losses equal those of an uninterrupted run, and
metrics.jsonl logs each step once. A NaN or infinite loss or gradient stops the run before that
step is saved, so the last saved state stays a good one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from gemma_jax import sharding
from gemma_jax.sppo import lora as lora_lib
from gemma_jax.sppo.data import PairDataset, build_dataset, pair_batch
from gemma_jax.sppo.loss import LOSS_TYPES, PairLogps, PairProbs, reward_metrics, sequence_logps, sppo_losses
from gemma_jax.tokenizer import Tokenizer
from gemma_jax.transformer import Transformer

log = logging.getLogger(__name__)

REFERENCE_LOGPS = "reference_logps.npz"
METRICS = "metrics.jsonl"
STATE_DIR = "state"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters; defaults are the released Gemma-2-9B-It SPPO runs (global batch 64 = 8 GPUs x 4 x 2)."""

    loss_type: str = "sppo"
    beta: float = 0.001  # eta = 1 / beta = 1000
    learning_rate: float = 5e-7
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    rmsprop_decay: float = 0.99
    rmsprop_eps: float = 1e-8
    batch_size: int = 64  # pairs per optimizer step
    grad_accum: int = 2  # micro-batches per optimizer step
    epochs: int = 1
    max_length: int = 1024
    max_prompt_length: int = 512
    reference_compat: bool = False
    seed: int = 42  # data order
    remat: bool = True
    param_dtype: str = "float32"  # trainable weights (float32 = master weights under bf16 compute)
    opt_dtype: str = "float32"  # optimizer state and update arithmetic
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = lora_lib.TARGETS
    reference_on_the_fly: bool = False
    # Run control, not hyperparameters: left out of equality so runs differing only here share compiles.
    save_every: int = dataclasses.field(default=50, compare=False)
    keep_checkpoints: int = dataclasses.field(default=2, compare=False)
    max_steps: int | None = dataclasses.field(default=None, compare=False)  # stop early; schedule sized by the full run

    def validate(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {self.loss_type!r} is not one of {LOSS_TYPES}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a positive multiple of grad_accum ({self.grad_accum})"
            )
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(f"need 0 < max_prompt_length ({self.max_prompt_length}) < max_length ({self.max_length})")
        for name in ("param_dtype", "opt_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                raise ValueError(f"{name} must be 'float32' or 'bfloat16', got {getattr(self, name)!r}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 = full fine-tuning), got {self.lora_rank}")
        if self.save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {self.save_every}")

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum


def learning_rate_schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    """HF's linear schedule with warmup: ceil(warmup_ratio * T) steps 0 -> lr, then lr -> 0 at step T."""
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    decay = optax.linear_schedule(cfg.learning_rate, 0.0, max(total_steps - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup), decay], [warmup])


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """clip(1.0) then torch.optim.RMSprop: v = a v + (1 - a) g^2; p -= lr g / (sqrt(v) + eps)."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.rmsprop(
            learning_rate_schedule(cfg, total_steps),
            decay=cfg.rmsprop_decay,
            eps=cfg.rmsprop_eps,
            eps_in_sqrt=False,
        ),
    )


class NonFiniteError(ValueError):
    """A step's loss or gradient is NaN or infinite; raised before that step's state can be saved."""


@dataclasses.dataclass
class TrainResult:
    model: Transformer  # plain (LoRA merged) model holding the trained weights
    history: list[dict]  # one metrics dict per optimizer step run by this call


# ---------------------------------------------------------------- the jitted pieces


def _policy_logps(graphdef, params, frozen, batch) -> jax.Array:
    """Summed response log-probs [rows] of the model split as (graphdef, params, frozen)."""
    model = nnx.merge(graphdef, params, frozen)
    logits, _ = model(batch["tokens"], None, batch["mask"])  # [rows, T, V] float32
    return sequence_logps(logits, batch["tokens"], batch["loss_mask"])


def _pair_logps(policy: jax.Array, reference: jax.Array) -> PairLogps:
    b = policy.shape[0] // 2  # rows are chosen [0, b) then rejected [b, 2b)
    return PairLogps(policy[:b], policy[b:], reference[:b], reference[b:])


def _loss(params, frozen, ref_params, batch, *, graphdef, cfg: TrainConfig):
    policy = _policy_logps(graphdef, params, frozen, batch)
    if ref_params is None:
        reference = batch["ref_logps"]
    else:
        reference = jax.lax.stop_gradient(_policy_logps(graphdef, ref_params, frozen, batch))
    logps = _pair_logps(policy, reference)
    probs = PairProbs(*(batch["probs"][:, i] for i in range(3)))
    loss = sppo_losses(logps, probs, beta=cfg.beta, loss_type=cfg.loss_type).mean()
    return loss, {"loss": loss, **reward_metrics(logps, beta=cfg.beta)}


@functools.lru_cache(maxsize=4)
def _cached_train_step(graphdef, cfg: TrainConfig, total_steps: int) -> Callable:
    """One jitted step per (model structure, hyperparameters, run length): `iterate` and resumes reuse it."""
    return make_train_step(graphdef, make_optimizer(cfg, total_steps), cfg)


@functools.lru_cache(maxsize=4)
def _logps_fn(graphdef) -> Callable:
    return jax.jit(lambda p, f, b: _policy_logps(graphdef, p, f, b))


def make_train_step(graphdef, tx: optax.GradientTransformation, cfg: TrainConfig) -> Callable:
    """(state, frozen, ref_params, batch [A, ...]) -> (state, metrics): A micro-batches, one update."""
    opt_dtype = jnp.dtype(cfg.opt_dtype)
    grad_fn = jax.value_and_grad(lambda p, f, r, b: _loss(p, f, r, b, graphdef=graphdef, cfg=cfg), has_aux=True)

    def step(state, frozen, ref_params, batch):
        params = state["params"]

        def micro(grad_sum, micro_batch):
            (_, metrics), grads = grad_fn(params, frozen, ref_params, micro_batch)
            grad_sum = jax.tree.map(lambda s, g: s + g.astype(opt_dtype), grad_sum, grads)
            return grad_sum, metrics

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, opt_dtype), params)
        grad_sum, metrics = jax.lax.scan(micro, zeros, batch)
        grads = jax.tree.map(lambda g: g / cfg.grad_accum, grad_sum)
        wide = jax.tree.map(lambda p: p.astype(opt_dtype), params)
        updates, opt_state = tx.update(grads, state["opt_state"], wide)
        new_params = jax.tree.map(lambda p, u: (p.astype(opt_dtype) + u).astype(p.dtype), params, updates)
        metrics = jax.tree.map(jnp.mean, metrics)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return jax.jit(step, donate_argnums=0)


# ---------------------------------------------------------------- data order


def batch_indices(n: int, cfg: TrainConfig, step: int) -> np.ndarray:
    """Pair indices of optimizer step `step`: a seeded permutation per epoch, cut into full batches."""
    per_epoch = n // cfg.batch_size
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
    return order[k * cfg.batch_size : (k + 1) * cfg.batch_size]


def stacked_batch(dataset: PairDataset, indices: np.ndarray, cfg: TrainConfig) -> dict[str, np.ndarray]:
    """The step's pairs as A micro-batches padded to one length: leaves [A, rows, ...]."""
    micro = [pair_batch(dataset, part, max_length=cfg.max_length) for part in np.split(indices, cfg.grad_accum)]
    t = max(m["tokens"].shape[1] for m in micro)
    padded = [{k: _pad_to(v, t) if v.ndim == 2 and k != "probs" else v for k, v in m.items()} for m in micro]
    return {k: np.stack([m[k] for m in padded]) for k in padded[0]}


def _step_batch(dataset: PairDataset, ref_table: np.ndarray | None, cfg: TrainConfig, step: int) -> dict:
    """Step `step`'s micro-batches, with the stored reference log-probs of their rows when precomputed."""
    indices = batch_indices(len(dataset), cfg, step)
    batch = stacked_batch(dataset, indices, cfg)
    if ref_table is not None:
        parts = np.split(indices, cfg.grad_accum)
        batch["ref_logps"] = np.stack([np.concatenate([ref_table[i, 0], ref_table[i, 1]]) for i in parts])  # [A, 2b]
    return batch


def _pad_to(x: np.ndarray, t: int) -> np.ndarray:
    return np.pad(x, ((0, 0), (0, t - x.shape[1])))


# ---------------------------------------------------------------- reference log-probs


def reference_logps(graphdef, params, frozen, dataset: PairDataset, cfg: TrainConfig, mesh=None) -> np.ndarray:
    """[N, 2] summed log-probs of chosen and rejected under the starting policy, in micro-batches."""
    fn = _logps_fn(graphdef)
    out = np.zeros((len(dataset), 2), np.float32)
    b = cfg.micro_batch
    for start in tqdm(range(0, len(dataset), b), desc="reference log-probs", leave=False):
        idx = np.arange(start, min(start + b, len(dataset)))
        batch = pair_batch(dataset, idx, max_length=cfg.max_length)
        logps = np.asarray(fn(params, frozen, _place({k: v for k, v in batch.items() if k != "probs"}, mesh, 0)))
        out[idx, 0], out[idx, 1] = logps[: len(idx)], logps[len(idx) :]
    return out


def _cached_reference_logps(run_dir: pathlib.Path, compute: Callable[[], np.ndarray], fingerprint: str) -> np.ndarray:
    """The stored table when it was computed for this data, else computed now and stored (atomically)."""
    path = run_dir / REFERENCE_LOGPS
    if path.is_file():
        with np.load(path) as stored:
            if str(stored["fingerprint"]) == fingerprint:
                return stored["logps"]
        log.warning("%s was computed for other data: recomputing", path)
    values = compute()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, logps=values, fingerprint=np.asarray(fingerprint))
    os.replace(tmp, path)
    return values


# ---------------------------------------------------------------- the loop


def init_state(
    tx: optax.GradientTransformation, trainable: nnx.State, cfg: TrainConfig, mesh: jax.sharding.Mesh | None = None
) -> dict:
    """{params, opt_state, step}: optimizer state in `opt_dtype`, laid out (on a mesh: sharded) like the params."""
    opt_dtype = jnp.dtype(cfg.opt_dtype)
    wide = jax.tree.map(lambda p: p.astype(opt_dtype), trainable)
    opt_state = jax.jit(tx.init)(wide) if mesh is None else sharding.init_optimizer(tx, wide, mesh)
    return {"params": trainable, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32)}


def split_model(model: Transformer, cfg: TrainConfig):
    """(graphdef, trainable, frozen): LoRA factors or every Param are trainable, the rest frozen."""
    if cfg.lora_rank:
        lora_lib.apply_lora(model, cfg.lora_targets, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
        graphdef, trainable, frozen = nnx.split(model, lora_lib.LoRAParam, ...)
    else:
        graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
    dtype = jnp.dtype(cfg.param_dtype)
    trainable = jax.tree.map(lambda x: x.astype(dtype), trainable)
    return graphdef, trainable, frozen


def train(
    model: Transformer,
    tokenizer: Tokenizer,
    rows: Sequence[dict],
    run_dir: str | os.PathLike,
    cfg: TrainConfig = TrainConfig(),
    *,
    source: str = "data",
    on_step: Callable[[int, dict], None] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> TrainResult:
    """Train `model` (pi_t, also the reference) on SPPO rows; resumes from `run_dir` when it holds a state.

    `on_step(step, metrics)` runs after every optimizer step (1-based step). Ctrl-C saves the state
    before exiting, so the run resumes where it stopped. With `mesh`, trainable weights and optimizer
    state follow `gemma_jax.sharding`'s rules (FSDP over `fsdp`) and each batch is split over the
    batch axes; load the model with the same mesh (`checkpoint.load_model(..., mesh=mesh)`).
    """
    cfg.validate()
    dataset = build_dataset(
        rows,
        tokenizer,
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        reference_compat=cfg.reference_compat,
        source=source,
    )
    if dataset.num_truncated:
        log.warning(
            "%d of %d pairs were longer than %d tokens and were truncated",
            dataset.num_truncated,
            len(dataset),
            cfg.max_length,
        )
    per_epoch = len(dataset) // cfg.batch_size
    if per_epoch == 0:
        raise ValueError(f"{source} has {len(dataset)} pairs, fewer than one batch of {cfg.batch_size}")
    if len(dataset) % cfg.batch_size:
        log.info("%d pairs per epoch do not fill a batch and are skipped", len(dataset) % cfg.batch_size)
    total = per_epoch * cfg.epochs
    end = total if cfg.max_steps is None else min(total, cfg.max_steps)

    origin = {"num_pairs": len(dataset), "data": dataset.fingerprint(), "seed": cfg.seed}
    run_dir = pathlib.Path(run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    manager = ocp.CheckpointManager(
        run_dir / STATE_DIR, options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True)
    )
    start = _check_resume(manager, origin)  # before any compile: a run dir over other data is an error
    model.remat = cfg.remat
    graphdef, trainable, frozen = split_model(model, cfg)
    if mesh is not None:
        trainable = _shard(trainable, mesh)
    saved_dtypes = jax.tree.map(lambda x: x.dtype, nnx.state(model, _filter(cfg)))
    nnx.update(model, trainable)  # the model holds the (cast) trainable weights: no second copy of them
    # A copy: the train step donates (overwrites) the buffers of the state it is given.
    ref_params = jax.tree.map(jnp.copy, trainable) if cfg.reference_on_the_fly else None
    ref_table = None
    if not cfg.reference_on_the_fly:  # pi_t's log-probs, before any update
        with sharding.on_mesh(mesh):
            ref_table = _cached_reference_logps(
                run_dir, lambda: reference_logps(graphdef, trainable, frozen, dataset, cfg, mesh), origin["data"]
            )
    state = init_state(make_optimizer(cfg, total), trainable, cfg, mesh)
    if start:
        state = _restore(manager, state)
        log.info("resumed from step %d of %d", start, total)

    step_fn = _cached_train_step(graphdef, cfg, total)
    _drop_metrics_after(run_dir / METRICS, start)
    history: list[dict] = []
    try:
        with (
            sharding.on_mesh(mesh),
            open(run_dir / METRICS, "a", encoding="utf-8") as metrics_file,
            tqdm(total=end, initial=start, desc="SPPO train", unit="step") as bar,
        ):
            for step in range(start, end):
                batch = _step_batch(dataset, ref_table, cfg, step)
                t0 = time.perf_counter()
                state, metrics = step_fn(state, frozen, ref_params, _place(batch, mesh, 1))
                metrics = {k: float(v) for k, v in metrics.items()}
                if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                    raise NonFiniteError(
                        f"step {step + 1}: the loss is {metrics['loss']} and the gradient norm "
                        f"{metrics['grad_norm']}; training stopped before saving this step. The last saved "
                        f"state (step {manager.latest_step() or 'none'}) in {manager.directory} is intact: check "
                        "the data's probabilities and log-probs, or lower --learning-rate, then rerun to resume"
                    )
                seconds = time.perf_counter() - t0
                metrics.update(
                    step=step + 1,
                    learning_rate=float(learning_rate_schedule(cfg, total)(step)),
                    tokens_per_s=float(batch["mask"].sum()) / seconds,
                    seconds=seconds,
                )
                history.append(metrics)
                metrics_file.write(json.dumps(metrics) + "\n")
                metrics_file.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4g}", margin=f"{metrics['rewards/margins']:.3g}")
                if (step + 1) % cfg.save_every == 0 or step + 1 == end:
                    _save(manager, state, step + 1, origin, cfg)
                if on_step is not None:
                    on_step(step + 1, metrics)
    except KeyboardInterrupt:
        done = int(state["step"])
        if done > (manager.latest_step() or 0):
            _save(manager, state, done, origin, cfg)
        log.warning("interrupted at step %d; rerun the same command to resume", done)
        raise
    finally:
        manager.wait_until_finished()
        manager.close()
    nnx.update(model, jax.tree.map(lambda new, dtype: new.astype(dtype), state["params"], saved_dtypes))
    if cfg.lora_rank:
        lora_lib.merge_lora(model)
    return TrainResult(model, history)


def _drop_metrics_after(path: pathlib.Path, step: int) -> None:
    """Keep the logged steps up to `step`, where the run resumes: the steps after it (run before a crash,
    never saved) are run and logged again. A line cut by a kill is dropped too. Rewritten atomically."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if _logged_step(line) <= step]
    if len(kept) < len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)


def _logged_step(line: str) -> float:
    """The step a metrics line logs; infinity for a line a kill cut short (never kept)."""
    try:
        return json.loads(line)["step"] if line.endswith("\n") else math.inf
    except (ValueError, KeyError, TypeError):
        return math.inf


def _shard(trainable: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
    trainable.replace_by_pure_dict(jax.device_put(trainable.to_pure_dict(), sharding.param_shardings(trainable, mesh)))
    return trainable


def _place(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh | None, axis: int) -> dict:
    """Split the rows (dimension `axis`) of every batch array over the mesh's batch axes."""
    if mesh is None:
        return batch

    def put(x: np.ndarray):
        axes = [None] * x.ndim
        axes[axis] = "batch"
        return jax.device_put(x, sharding.logical_sharding(axes, mesh, x.shape))

    return {k: put(v) for k, v in batch.items()}


def _filter(cfg: TrainConfig):
    return lora_lib.LoRAParam if cfg.lora_rank else nnx.Param


def _progress(step: int, origin: dict, cfg: TrainConfig) -> dict:
    """The data position after `step` steps, and what identifies the run (data hash, size, order seed)."""
    epoch, k = divmod(step, origin["num_pairs"] // cfg.batch_size)
    return {"step": step, "epoch": epoch, "position": k * cfg.batch_size, **origin}


def _save(manager: ocp.CheckpointManager, state: dict, step: int, origin: dict, cfg: TrainConfig) -> None:
    progress = ocp.args.JsonSave(_progress(step, origin, cfg))
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), progress=progress))


def _check_resume(manager: ocp.CheckpointManager, origin: dict) -> int:
    """The step to resume from (0 for a new run); an error if the saved run used other data or order."""
    step = manager.latest_step()
    if step is None:
        return 0
    progress = manager.restore(step, args=ocp.args.Composite(progress=ocp.args.JsonRestore())).progress
    saved = {k: progress.get(k) for k in origin}
    if saved != origin:
        raise ValueError(
            f"{manager.directory} holds a run over other data or data order ({saved}, now {origin}): "
            "use a new run directory, or the data and --data-seed of that run"
        )
    return step


def _restore(manager: ocp.CheckpointManager, state: dict) -> dict:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    return manager.restore(manager.latest_step(), args=args).state
