"""End to end: two SPPO iterations (`python -m gemma_jax.sppo iterate`) on a tiny model with a synthetic reward.

The reward counts CJK/kana/Hangul characters in a response; the tiny tokenizer has ~20 such pieces
out of 480, so a random policy writes one in about a third of its responses. Two iterations of
self-play (sample, score with the reward, train) must raise that rate on held-out prompts.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
from flax import nnx

import gemma_jax as gj
from gemma_jax import checkpoint
from gemma_jax.sampler import Sampler
from gemma_jax.sppo.__main__ import main
from gemma_jax.sppo.selfplay import sample_responses

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "how", "are", "you"]


def _east_asian(c: str) -> bool:
    o = ord(c)
    return 0x3040 <= o <= 0x30FF or 0x4E00 <= o <= 0x9FFF or 0xAC00 <= o <= 0xD7AF


def east_asian_reward(prompt: str, response: str) -> float:
    """The synthetic preference: more CJK/kana/Hangul characters is better."""
    return float(sum(map(_east_asian, response)))


def _prompts(rng: np.random.Generator, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, rng.integers(3, 7))) for _ in range(n)]


def _preferred_rate(ckpt, tokenizer, prompts: list[str]) -> float:
    model = checkpoint.load_model(ckpt, dtype=jnp.float32)
    rows = sample_responses(Sampler(model, tokenizer, cache_length=64), prompts, k=4, max_new_tokens=12, seed=123)
    return float(np.mean([east_asian_reward("", r) > 0 for row in rows for r in row["responses"]]))


def test_two_iterations_raise_preferred_rate(tiny_tokenizer, tmp_path):
    config = gj.gemma2_tiny(vocab_size=tiny_tokenizer.vocab_size, num_layers=2)
    model = gj.Transformer(config, rngs=nnx.Rngs(0))
    start = checkpoint.save(
        tmp_path / "start", config, gj.params_of(model), dtype="float32", tokenizer_dir=tiny_tokenizer.model_file.parent
    )
    rng = np.random.default_rng(0)
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in _prompts(rng, 64)))
    held_out = _prompts(np.random.default_rng(1), 32)

    # fmt: off
    rc = main([
        "iterate", "--model", str(start), "--prompts", str(prompts_file), "--iterations", "2",
        "--out", str(tmp_path / "run"), "--format", "jsonl",
        "--scorer", f"reward:{__name__}:east_asian_reward",
        "--k", "4", "--max-new-tokens", "12", "--cache-length", "64", "--gen-batch-size", "32",
        "--dtype", "float32", "--save-dtype", "float32",
        "--beta", "0.1", "--lr", "3e-3", "--warmup-ratio", "0", "--batch-size", "8", "--grad-accum", "1",
        "--epochs", "3",
    ])
    # fmt: on
    assert rc == 0
    final = tmp_path / "run" / "iter2" / "run" / "checkpoint"
    assert checkpoint.is_checkpoint(final)
    hf = checkpoint.export_hf(final, tmp_path / "hf", progress=False)  # what convert/orbax_to_hf.py runs
    assert (hf / "config.json").is_file() and (hf / "tokenizer.model").is_file()
    before = _preferred_rate(start, tiny_tokenizer, held_out)
    after = _preferred_rate(final, tiny_tokenizer, held_out)
    assert after >= before + 0.2, (before, after)
