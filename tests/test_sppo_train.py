"""SPPO training on a tiny model: an update lowers the loss on its batch; a killed run resumes exactly."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

import gemma_jax as gj
from gemma_jax.sppo import trainer as sppo_train
from gemma_jax.sppo.data import build_dataset

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world"]


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(0)

    def text(n):
        return " ".join(rng.choice(WORDS, n))

    out = []
    for _ in range(8):
        prompt = text(4)
        p_win, p_lose = rng.uniform(0.5, 0.9), rng.uniform(0.1, 0.5)
        out.append(
            {
                "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": text(5)}],
                "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": text(3)}],
                "chosen_probs": float(rng.uniform(0.5, 1)),
                "chosen_probs_win": float(p_win),
                "chosen_probs_lose": float(p_lose),
            }
        )
    return out


def tiny_model(vocab: int) -> gj.Transformer:
    return gj.Transformer(gj.gemma2_tiny(vocab_size=vocab, num_layers=2), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_one_update_lowers_the_loss_on_its_batch(rows, tiny_tokenizer, param_dtype):
    """Also with bfloat16 weights and the float32 optimizer state beside them."""
    cfg = sppo_train.TrainConfig(
        batch_size=4, grad_accum=2, learning_rate=1e-4, beta=0.1, warmup_ratio=0.0, param_dtype=param_dtype
    )
    model = tiny_model(tiny_tokenizer.vocab_size)
    model.remat = True
    graphdef, params, frozen = sppo_train.split_model(model, cfg)
    dataset = build_dataset(rows, tiny_tokenizer)
    ref = sppo_train.reference_logps(graphdef, params, frozen, dataset, cfg)
    indices = np.arange(4)
    batch = sppo_train.stacked_batch(dataset, indices, cfg)
    batch["ref_logps"] = np.stack([np.concatenate([ref[i, 0], ref[i, 1]]) for i in np.split(indices, 2)])
    loss_fn = jax.jit(lambda p, b: sppo_train._loss(p, frozen, None, b, graphdef=graphdef, cfg=cfg)[0])

    def batch_loss(p):
        return np.mean([float(loss_fn(p, jax.tree.map(lambda x, i=i: x[i], batch))) for i in range(2)])

    tx = sppo_train.make_optimizer(cfg, total_steps=10)
    state = sppo_train.init_state(tx, params, cfg)
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(param_dtype)}
    assert {x.dtype for x in jax.tree.leaves(state["opt_state"]) if x.ndim} == {np.dtype("float32")}
    before = batch_loss(params)
    state, metrics = sppo_train.make_train_step(graphdef, tx, cfg)(jax.tree.map(np.asarray, state), frozen, None, batch)
    assert float(metrics["loss"]) == pytest.approx(before, rel=1e-5)
    assert batch_loss(state["params"]) < 0.9 * before


RESUME_CFG = sppo_train.TrainConfig(batch_size=4, grad_accum=2, epochs=2, learning_rate=1e-3, beta=0.1, lora_rank=4)


@pytest.fixture(scope="module")
def uninterrupted(rows, tiny_tokenizer, tmp_path_factory):
    model = tiny_model(tiny_tokenizer.vocab_size)
    return sppo_train.train(model, tiny_tokenizer, rows, tmp_path_factory.mktemp("run"), RESUME_CFG)


@pytest.mark.parametrize(("kill", "save_every", "at"), [(RuntimeError, 1, 2), (KeyboardInterrupt, 100, 1)])
def test_killed_run_resumes_with_the_same_losses(rows, tiny_tokenizer, tmp_path, uninterrupted, kill, save_every, at):
    """A crash after a save, or Ctrl-C (which saves first), then the same command again."""
    cfg = dataclasses.replace(RESUME_CFG, save_every=save_every)
    assert [h["step"] for h in uninterrupted.history] == [1, 2, 3, 4]

    def die(step, metrics):
        if step == at:
            raise kill("killed")

    with pytest.raises(kill, match="killed"):
        sppo_train.train(tiny_model(tiny_tokenizer.vocab_size), tiny_tokenizer, rows, tmp_path, cfg, on_step=die)
    resumed = sppo_train.train(tiny_model(tiny_tokenizer.vocab_size), tiny_tokenizer, rows, tmp_path, cfg)
    assert [h["step"] for h in resumed.history] == list(range(at + 1, 5))
    for a, b in zip(uninterrupted.history[at:], resumed.history, strict=True):
        for key in ("loss", "rewards/margins", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
    with pytest.raises(ValueError, match="holds a run over other data"):
        sppo_train.train(tiny_model(tiny_tokenizer.vocab_size), tiny_tokenizer, rows[::-1], tmp_path, cfg)
    # the returned model is plain (adapters merged) and equals the uninterrupted run's
    kernel = ("groups", "layers", 0, "attn", "q", "kernel")
    np.testing.assert_allclose(
        _get(gj.params_of(resumed.model), kernel), _get(gj.params_of(uninterrupted.model), kernel)
    )


def _logged_steps(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / sppo_train.METRICS).read_text().splitlines()]


def test_resume_after_a_crash_between_saves_logs_each_step_once(rows, tiny_tokenizer, tmp_path, uninterrupted):
    """Steps 1-3 run, 2 saved, a crash: the rerun repeats step 3 and metrics.jsonl keeps one line per step."""
    cfg = dataclasses.replace(RESUME_CFG, save_every=2)

    def die(step, metrics):
        if step == 3:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        sppo_train.train(tiny_model(tiny_tokenizer.vocab_size), tiny_tokenizer, rows, tmp_path, cfg, on_step=die)
    with open(tmp_path / sppo_train.METRICS, "a") as f:
        f.write('{"step": 4, "loss"')  # a line cut short by kill -9
    resumed = sppo_train.train(tiny_model(tiny_tokenizer.vocab_size), tiny_tokenizer, rows, tmp_path, cfg)
    assert [h["step"] for h in resumed.history] == [3, 4]
    assert _logged_steps(tmp_path) == [1, 2, 3, 4]
    assert resumed.history[0]["loss"] == pytest.approx(uninterrupted.history[2]["loss"], rel=1e-6)


def test_non_finite_loss_stops_before_saving_and_the_last_save_resumes(
    rows, tiny_tokenizer, tmp_path, uninterrupted, monkeypatch
):
    cfg = dataclasses.replace(RESUME_CFG, save_every=1)
    real_batch = sppo_train._step_batch

    def poisoned(dataset, ref_table, cfg, step):  # step 3's probabilities are NaN (the data check is bypassed)
        batch = real_batch(dataset, ref_table, cfg, step)
        if step == 2:
            batch["probs"] = np.full_like(batch["probs"], np.nan)
        return batch

    monkeypatch.setattr(sppo_train, "_step_batch", poisoned)
    with pytest.raises(sppo_train.NonFiniteError, match=r"step 3: the loss is nan .* last saved state \(step 2\)"):
        sppo_train.train(tiny_model(tiny_tokenizer.vocab_size), tiny_tokenizer, rows, tmp_path, cfg)
    assert _logged_steps(tmp_path) == [1, 2]
    monkeypatch.setattr(sppo_train, "_step_batch", real_batch)
    resumed = sppo_train.train(tiny_model(tiny_tokenizer.vocab_size), tiny_tokenizer, rows, tmp_path, cfg)
    assert [h["step"] for h in resumed.history] == [3, 4]
    for a, b in zip(uninterrupted.history[2:], resumed.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def test_fsdp_and_on_the_fly_reference_match_single_device(rows, tiny_tokenizer, tmp_path):
    """Full fine-tuning over 8 devices (FSDP) with the reference recomputed each step = one device, precomputed."""
    from gemma_jax.sharding import make_mesh

    cfg = sppo_train.TrainConfig(batch_size=8, grad_accum=1, epochs=2, learning_rate=1e-4, beta=0.1, warmup_ratio=0)
    vocab = tiny_tokenizer.vocab_size
    single = sppo_train.train(tiny_model(vocab), tiny_tokenizer, rows, tmp_path / "one", cfg)
    mesh = make_mesh("fsdp=8")
    on_the_fly = dataclasses.replace(cfg, reference_on_the_fly=True)
    sharded = sppo_train.train(tiny_model(vocab), tiny_tokenizer, rows, tmp_path / "fsdp", on_the_fly, mesh=mesh)
    assert not (tmp_path / "fsdp" / sppo_train.REFERENCE_LOGPS).exists()
    for a, b in zip(single.history, sharded.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert single.history[1]["loss"] < single.history[0]["loss"]


def test_bad_config_fails_before_work(rows, tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="multiple of grad_accum"):
        sppo_train.train(tiny_model(512), tiny_tokenizer, rows, tmp_path, sppo_train.TrainConfig(batch_size=5))
    with pytest.raises(ValueError, match="fewer than one batch"):
        sppo_train.train(tiny_model(512), tiny_tokenizer, rows, tmp_path, sppo_train.TrainConfig(batch_size=16))
    with pytest.raises(ValueError, match="LoRA target 'attn' matches no module"):
        sppo_train.train(
            tiny_model(512),
            tiny_tokenizer,
            rows,
            tmp_path,
            sppo_train.TrainConfig(batch_size=4, lora_rank=2, lora_targets=("attn",)),
        )


def test_optimizer_state_is_sharded_like_the_params():
    """On a mesh the RMSProp state lives where its parameter lives, not replicated on every device."""
    from gemma_jax.sharding import make_mesh

    mesh = make_mesh("fsdp=8")
    cfg = sppo_train.TrainConfig()
    _, trainable, _ = sppo_train.split_model(tiny_model(512), cfg)
    trainable = sppo_train._shard(trainable, mesh)
    state = sppo_train.init_state(sppo_train.make_optimizer(cfg, 10), trainable, cfg, mesh)
    embedding = trainable["embedder"]["embedding"][...]
    assert not embedding.sharding.is_fully_replicated
    same_shape = [x for x in jax.tree.leaves(state["opt_state"]) if x.shape == embedding.shape]
    assert same_shape and all(x.sharding.is_equivalent_to(embedding.sharding, embedding.ndim) for x in same_shape)
