"""The self-play data step: K samples per prompt from the current policy, then one scored pair per prompt.

Sampling follows the reference's `generate.py`: temperature 0.7, top-p 0.9, and K passes over the
prompts, pass k seeded with seed + 50 k (the reference uses seeds 0, 50, ..., 200). Prompts are
wrapped in the chat template, the string the reference gives vLLM.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from gemma_jax.sampler import Sampler
from gemma_jax.sppo.preference import Scorer, check_matrix, pair_row
from gemma_jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SEED_STRIDE = 50  # the reference's set_seed(p * 50)


def sample_responses(
    sampler: Sampler,
    prompts: Sequence[str],
    *,
    k: int = 5,
    max_new_tokens: int = 2048,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    batch_size: int = 64,
) -> list[dict]:
    """Rows {"prompt", "responses": [K texts]}; sample j of every prompt comes from pass j's seed."""
    if k < 2:
        raise ValueError(f"k must be >= 2 (SPPO compares samples of the same prompt), got {k}")
    if not prompts:
        raise ValueError("no prompts to sample from")
    rows = [{"prompt": p, "responses": []} for p in prompts]
    starts = range(0, len(prompts), batch_size)
    truncated = 0
    with tqdm(total=k * len(prompts), desc="self-play samples", unit="sample") as bar:
        for j in range(k):
            for b, start in enumerate(starts):
                batch_seed = int(np.random.SeedSequence([seed + SEED_STRIDE * j, b]).generate_state(1)[0] >> 1)
                completions = sampler.generate(
                    list(prompts[start : start + batch_size]),
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    seed=batch_seed,
                    chat=True,
                )
                for row, c in zip(rows[start : start + batch_size], completions, strict=True):
                    row["responses"].append(c.text)
                    truncated += c.finish_reason == "length"
                bar.update(len(completions))
    if truncated:
        log.info("%d of %d samples hit max_new_tokens=%d", truncated, k * len(prompts), max_new_tokens)
    return rows


def score_samples(
    samples: Sequence[dict],
    scorer: Scorer,
    *,
    tokenizer: Tokenizer | None = None,
    reference_compat: bool = False,
) -> list[dict]:
    """One training row per prompt in the reference's columns (chosen, rejected, chosen_probs, ...).

    With `reference_compat` the scorer sees the chat-templated prompt, as PairRM does in the
    reference's rank.py; otherwise the raw prompt.
    """
    if reference_compat and tokenizer is None:
        raise ValueError("reference_compat scoring templates the prompt: pass the policy's tokenizer")
    rows = []
    for i, sample in enumerate(tqdm(samples, desc="scoring", unit="prompt")):
        prompt, responses = sample["prompt"], list(sample["responses"])
        if len(responses) < 2:
            raise ValueError(f"sample {i} has {len(responses)} responses; scoring needs K >= 2")
        shown = prompt
        if reference_compat:
            shown = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        matrix = check_matrix(scorer(shown, responses), len(responses), scorer)
        rows.append(pair_row(prompt, responses, matrix))
    return rows
