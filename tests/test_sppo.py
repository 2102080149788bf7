"""SPPO pieces against independent oracles: NumPy losses, the reference's win-rate formulas, torch's RMSprop."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import gemma_jax as gj
from gemma_jax.sppo import data, lora, preference, selfplay
from gemma_jax.sppo import trainer as sppo_train
from gemma_jax.sppo.__main__ import main
from gemma_jax.sppo.judge import JudgeScorer
from gemma_jax.sppo.loss import PairLogps, PairProbs, sequence_logps, sppo_losses

# ---------------------------------------------------------------- loss


def numpy_loss(lp_w, lp_l, lr_w, lr_l, p, p_win, p_lose, beta, loss_type):
    """The spec's formulas, written out in float64."""
    eta = 1.0 / beta
    w, l = lp_w - lr_w, lp_l - lr_l
    if loss_type == "sppo":
        return np.mean(((w - eta * (p_win - 0.5)) ** 2 + (l - eta * (p_lose - 0.5)) ** 2) / 2)
    if loss_type == "sppo_single":
        return np.mean(((w - eta * (p - 0.5)) ** 2 + (l + eta * (p - 0.5)) ** 2) / 2)
    return np.mean((w - 0.5 / beta) ** 2 + (l + 0.5 / beta) ** 2)


@pytest.mark.parametrize("loss_type", ["sppo", "sppo_single", "sppo_hard"])
@pytest.mark.parametrize("beta", [0.001, 0.1])
def test_losses_match_numpy(loss_type, beta):
    rng = np.random.default_rng(0)
    logps = -rng.uniform(10, 400, (4, 16))  # policy w, policy l, reference w, reference l
    logps[:2] += rng.normal(0, 5, (2, 16))
    probs = rng.uniform(0.1, 0.9, (3, 16))
    want = numpy_loss(*logps, *probs, beta, loss_type)
    got = sppo_losses(
        PairLogps(*map(jnp.asarray, logps)), PairProbs(*map(jnp.asarray, probs)), beta=beta, loss_type=loss_type
    )
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got.mean()), want, rtol=1e-6)


def test_bad_loss_type():
    x = jnp.zeros(2)
    with pytest.raises(ValueError, match="loss_type 'dpo'"):
        sppo_losses(PairLogps(x, x, x, x), PairProbs(x, x, x), beta=0.1, loss_type="dpo")


def test_sequence_logps_shift_and_mask():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 6, 11)).astype(np.float32)
    tokens = rng.integers(0, 11, (2, 6))
    mask = np.array([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 0, 0]], bool)  # prompt masked; padding at the end
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = [sum(logp[b, t - 1, tokens[b, t]] for t in range(6) if mask[b, t]) for b in range(2)]
    np.testing.assert_allclose(
        sequence_logps(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask)), want, rtol=1e-6
    )


# ---------------------------------------------------------------- win rates


def reference_columns(scores):
    """compute_prob.py: P from the scores, w/l by argmax/argmin of the scores, row sums / K."""
    s = np.asarray(scores, np.float64)
    k = len(s)
    prb = np.zeros((k, k))
    for i in range(k):
        for j in range(k):
            prb[i][j] = 1 / (1 + np.exp(s[j] - s[i]))
    w, l = int(s.argmax()), int(s.argmin())
    sums = prb.sum(axis=1)
    return w, l, prb[w][l], sums[w] / k, sums[l] / k


@pytest.mark.parametrize(
    "scores",
    [[0.3, -1.2, 2.5, 0.0, 1.1], [1.0, 2.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0], [5.0, -5.0], [-3.0, 7.0, 7.0]],
)
def test_win_rates_match_reference(scores):
    responses = [f"r{i}" for i in range(len(scores))]
    row = preference.pair_row("x", responses, preference.bradley_terry(scores))
    w, l, p, p_win, p_lose = reference_columns(scores)
    assert list(row) == list(preference.COLUMNS)
    assert row["chosen"] == [{"content": "x", "role": "user"}, {"content": f"r{w}", "role": "assistant"}]
    assert row["rejected"][1]["content"] == f"r{l}"
    assert (row["chosen_probs"], row["chosen_probs_win"], row["chosen_probs_lose"]) == (p, p_win, p_lose)


def test_scorer_wrong_shape_is_named():
    with pytest.raises(ValueError, match=r"shape \(3, 4\) for 4 responses; it must return \[K, K\] = \(4, 4\)"):
        selfplay.score_samples([{"prompt": "p", "responses": list("abcd")}], lambda p, r: np.zeros((3, 4)))
    with pytest.raises(ValueError, match="outside"):
        preference.check_matrix(np.full((2, 2), 1.5), 2)


def test_reward_and_pairrm_scorers():
    rows = selfplay.score_samples(
        [{"prompt": "p", "responses": ["a", "bbb", "bb"]}], preference.RewardScorer(lambda p, r: len(r))
    )
    assert rows[0]["chosen"][1]["content"] == "bbb" and rows[0]["rejected"][1]["content"] == "a"

    class FakeBlender:  # llm-blender's Blender.rank(inputs, candidates, return_scores=True) -> [N, K]
        def rank(self, inputs, candidates, return_scores, batch_size, disable_tqdm):
            assert return_scores and inputs == ["p"]
            return np.array([[0.5, -1.0, 2.0]])

    p = preference.PairRMScorer(blender=FakeBlender())("p", ["a", "b", "c"])
    np.testing.assert_array_equal(p, preference.bradley_terry([0.5, -1.0, 2.0]))


# ---------------------------------------------------------------- tokenization and files


def test_tokenize_clean_and_reference_compat(tiny_tokenizer):
    tok = tiny_tokenizer
    eot = tok.encode("<end_of_turn>", add_bos=False)
    sot_model = tok.encode("<start_of_turn>model\n", add_bos=False)
    clean = data.tokenize_pair(tok, "hello world", " the fox ", "dog")
    assert clean.prompt == tok.encode_chat([{"role": "user", "content": "hello world"}])
    assert clean.prompt[:2] != [tok.bos_id, tok.bos_id] and clean.prompt[-len(sot_model) :] == sot_model
    assert clean.chosen == tok.encode("the fox", add_bos=False) + eot
    compat = data.tokenize_pair(tok, "hello world", " the fox ", "dog", reference_compat=True)
    assert compat.prompt[:2] == [tok.bos_id, tok.bos_id]  # the reference's double BOS
    assert compat.chosen == sot_model + tok.encode("the fox<end_of_turn>\n", add_bos=False) + [tok.eos_id]


def test_truncation_rules(tiny_tokenizer):
    long_prompt, long_answer = "hello " * 60, "fox " * 60
    for compat in (False, True):
        pair = data.tokenize_pair(
            tiny_tokenizer,
            long_prompt,
            long_answer,
            "dog",
            max_length=64,
            max_prompt_length=24,
            reference_compat=compat,
        )
        assert pair.truncated and len(pair.prompt) == 24 and len(pair.chosen) == 64 - 24
        assert (pair.prompt[0] == tiny_tokenizer.bos_id) != compat  # clean keeps BOS; the reference cuts it
        full = data.tokenize_pair(tiny_tokenizer, long_prompt, "fox", "dog", reference_compat=compat)
        assert pair.prompt[-5:] == full.prompt[-5:]  # keep-end


def test_missing_column_is_named(tiny_tokenizer, tmp_path):
    rows = [{"chosen": [], "rejected": [], "chosen_probs": 0.5, "chosen_probs_win": 0.5}]
    with pytest.raises(ValueError, match="no column 'chosen_probs_lose'"):
        data.build_dataset(rows, tiny_tokenizer, source="x.jsonl")
    path = data.write_rows(tmp_path / "p.jsonl", [{"text": "a"}])
    with pytest.raises(ValueError, match="no column 'prompt'"):
        data.load_prompts(str(path))


GOOD_ROW = preference.pair_row("p", ["a", "b"], preference.bradley_terry([1.0, 0.0]))


def _jsonl(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


def _row(**changes) -> str:
    return json.dumps(GOOD_ROW | changes)


BAD_DATA = {  # file contents -> the error naming file, line and column
    "json_line_11": (
        _jsonl([_row()] * 5 + [""] + [_row()] * 4 + ['{"chosen": [}']),
        r"line 11, column 13: invalid JSON",
    ),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\xff", r"line 1: not UTF-8 text \(byte 1\); is it a binary file\?"),
    "not_an_object": (_jsonl([_row(), "[1, 2]"]), r"line 2: expected a JSON object \(one row\), got list"),
    "chosen_string": (_jsonl([_row(chosen="hi")]), r"line 1, column 'chosen': expected a list of messages"),
    "null_content": (
        _jsonl([_row(rejected=[{"role": "user", "content": "p"}, {"role": "assistant", "content": None}])]),
        r"line 1, column 'rejected': the 'assistant' message's content must be a string, got None",
    ),
    "no_assistant": (
        _jsonl([_row(chosen=[{"role": "user", "content": "p"}])]),
        r"line 1, column 'chosen': no 'assistant' message",
    ),
    "string_prob": (_jsonl([_row(), _row(chosen_probs="0.5")]), r"line 2, column 'chosen_probs': .* got '0\.5'"),
    "nan_prob": (_jsonl([_row(chosen_probs_win=float("nan"))]), r"line 1, column 'chosen_probs_win': .* got nan"),
    "inf_prob": (_jsonl([_row(chosen_probs_lose=float("inf"))]), r"line 1, column 'chosen_probs_lose': .* got inf"),
    "above_one": (
        _jsonl([_row(chosen_probs=5.0)]),
        r"line 1, column 'chosen_probs': expected a probability in \[0, 1\], got 5\.0",
    ),
    "negative": (_jsonl([_row(chosen_probs_win=-3.0)]), r"line 1, column 'chosen_probs_win': .* got -3\.0"),
    "bool_prob": (_jsonl([_row(chosen_probs=True)]), r"line 1, column 'chosen_probs': .* got True"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_training_data_is_named_by_file_line_and_column(tmp_path, capsys, case):
    content, message = BAD_DATA[case]
    path = tmp_path / "train.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    # the data is checked before the model loads: a model that does not exist is never reached
    args = ["train", "--model", str(tmp_path / "no-model"), "--data", str(path), "--out", str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search(rf"^error: {re.escape(str(path))}, {message}", err), err
    assert not (tmp_path / "run").exists()


def test_good_rows_pass_and_parquet_rows_are_named_by_index(tmp_path):
    pytest.importorskip("pyarrow")
    data.check_pairs(data.read_rows(data.write_rows(tmp_path / "ok.jsonl", [GOOD_ROW, GOOD_ROW | {"chosen_probs": 1}])))
    path = data.write_rows(tmp_path / "t.parquet", [GOOD_ROW, GOOD_ROW | {"chosen_probs": 1.5}])
    with pytest.raises(ValueError, match=r"t\.parquet, row 1, column 'chosen_probs': .* got 1\.5"):
        data.check_pairs(data.read_rows(path))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"bad\.parquet: not a readable parquet file"):
        data.read_rows(tmp_path / "bad.parquet")


def test_parquet_round_trip(tmp_path):
    pytest.importorskip("pyarrow")
    row = preference.pair_row("p", ["a", "b"], preference.bradley_terry([1.0, 0.0]))
    assert data.read_rows(data.write_rows(tmp_path / "t.parquet", [row])) == [row]


# ---------------------------------------------------------------- LoRA


def test_lora_starts_at_base_merges_exactly_and_rejects_unknown_targets():
    config = gj.gemma2_tiny(num_layers=3)
    model = gj.Transformer(config, rngs=nnx.Rngs(0))
    tokens = jnp.asarray([[2, 17, 33, 41, 5]])
    forward = nnx.jit(lambda m: m(tokens)[0])  # one compile per module structure; eager scans are slow
    base = forward(model)
    with pytest.raises(ValueError, match="LoRA target 'qkv' matches no module"):
        lora.apply_lora(model, ["qkv"], rank=2, alpha=4)
    wrapped = lora.apply_lora(model, ["q_proj", "down"], rank=2, alpha=4)
    assert "groups.layers.0.attn.q" in wrapped and "tail.layers.0.mlp.down" in wrapped
    np.testing.assert_array_equal(forward(model), base)
    graphdef, factors, rest = nnx.split(model, lora.LoRAParam, ...)
    factors = jax.tree.map(lambda x: jax.random.normal(jax.random.key(0), x.shape) * 0.3, factors)
    model = nnx.merge(graphdef, factors, rest)
    adapted = forward(model)
    assert np.abs(adapted - base).max() > 1e-2
    merged = forward(lora.merge_lora(model))
    np.testing.assert_allclose(merged, adapted, atol=2e-5)
    assert not any(isinstance(m, lora.LoRALinear) for _, m in nnx.iter_graph(model))


# ---------------------------------------------------------------- optimizer


def test_rmsprop_matches_torch():
    torch = pytest.importorskip("torch")
    cfg = sppo_train.TrainConfig(learning_rate=1e-2, warmup_ratio=0.25)
    total = 8
    tx, schedule = sppo_train.make_optimizer(cfg, total), sppo_train.learning_rate_schedule(cfg, total)
    rng = np.random.default_rng(0)
    p0 = {"a": rng.normal(size=(5, 3)).astype(np.float32), "b": rng.normal(size=(7,)).astype(np.float32)}
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) * 0.5 for k, v in p0.items()} for _ in range(4)]

    params, state = jax.tree.map(jnp.asarray, p0), None
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, updates)

    tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in p0.items()}
    opt = torch.optim.RMSprop(list(tp.values()), lr=1.0)  # torch defaults: alpha 0.99, eps 1e-8
    for step, g in enumerate(grads):
        for k, p in tp.items():
            p.grad = torch.tensor(g[k])
        torch.nn.utils.clip_grad_norm_(list(tp.values()), 1.0)
        opt.param_groups[0]["lr"] = float(schedule(step))  # HF's LambdaLR: warmup ceil(0.1 T), linear decay
        opt.step()
    for k in p0:
        np.testing.assert_allclose(params[k], tp[k].detach().numpy(), rtol=1e-6, atol=1e-7)
    assert [float(schedule(s)) for s in (0, 1, 2, 5, 8)] == pytest.approx([0.0, 5e-3, 1e-2, 0.5e-2, 0.0])


def test_judge_scorer_averages_both_orders(tiny_tokenizer):
    model = gj.Transformer(gj.gemma2_tiny(vocab_size=tiny_tokenizer.vocab_size, num_layers=2), rngs=nnx.Rngs(0))
    p = JudgeScorer(model, tiny_tokenizer)("hello world", ["the fox", "a lazy dog", "how are you"])
    assert p.shape == (3, 3) and np.all(np.diag(p) == 0.5)
    np.testing.assert_allclose(p + p.T, 1.0, atol=1e-12)
    assert np.abs(p - 0.5).max() > 1e-6  # the random judge does prefer something


def test_cli_errors_are_named(tmp_path, capsys):
    samples = data.write_rows(tmp_path / "s.jsonl", [{"prompt": "p", "outputs": ["a", "b"]}])
    assert main(["score", "--samples", str(samples), "--out", str(tmp_path / "t.jsonl"), "--scorer", "pairrm"]) == 2
    assert "no column 'responses'" in capsys.readouterr().err
    rows = data.write_rows(tmp_path / "t.jsonl", [{"chosen": []}])
    args = ["train", "--model", str(tmp_path / "none"), "--data", str(rows), "--out", str(tmp_path / "run")]
    assert main([*args, "--lora-rank", "4", "--lora-targets", "q,qkv"]) == 2
    assert "LoRA target 'qkv' matches no module" in capsys.readouterr().err
    samples = data.write_rows(tmp_path / "s.jsonl", [{"prompt": "p", "responses": ["a", "b"]}])
    assert main(["score", "--samples", str(samples), "--out", str(tmp_path / "t.jsonl"), "--scorer", "x"]) == 2
    assert "unknown scorer 'x'" in capsys.readouterr().err
