"""Preference scorers and the win-rate columns SPPO trains on (the reference's `compute_prob.py`).

A scorer maps (prompt, K responses) to a K x K matrix P with P[i, j] = P(response i beats j) and 1/2
on the diagonal. From P the reference keeps two responses per prompt:
  w = argmax_i sum_j P[i, j],  l = argmin_i sum_j P[i, j]   (first index on ties, as numpy)
  chosen_probs = P[w, l],  chosen_probs_win = mean_j P[w, j],  chosen_probs_lose = mean_j P[l, j]
(the means include the diagonal 1/2, so with K = 5 they lie in (0.1, 0.9)). The reference picks w, l by
the argmax/argmin of the PairRM scores s and builds P = sigmoid(s_i - s_j); row sums of that P are
strictly increasing in s and equal for equal s, so the selection here is the same.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

COLUMNS = ("chosen", "rejected", "chosen_probs", "chosen_probs_win", "chosen_probs_lose")


class Scorer(Protocol):
    """(prompt, K responses) -> [K, K] win-probability matrix."""

    def __call__(self, prompt: str, responses: Sequence[str]) -> np.ndarray: ...


def bradley_terry(scores: Sequence[float]) -> np.ndarray:
    """P[i, j] = 1 / (1 + exp(s_j - s_i)) in float64, diagonal exactly 1/2: [K] -> [K, K]."""
    s = np.asarray(scores, np.float64)
    return 1.0 / (1.0 + np.exp(s[None, :] - s[:, None]))


def check_matrix(matrix: np.ndarray, k: int, scorer: object = None) -> np.ndarray:
    """The scorer's output as float64 [K, K], or a ValueError naming what is wrong with it."""
    who = f"scorer {scorer!r}" if scorer is not None else "scorer"
    m = np.asarray(matrix, np.float64)
    if m.shape != (k, k):
        raise ValueError(
            f"{who} returned a matrix of shape {m.shape} for {k} responses; it must return [K, K] = ({k}, {k}) "
            "win probabilities P[i, j] = P(response i beats response j)"
        )
    if not np.all(np.isfinite(m)) or m.min() < 0 or m.max() > 1:
        raise ValueError(f"{who} returned values outside [0, 1] (or NaN); P[i, j] must be probabilities")
    return m


def pair_row(prompt: str, responses: Sequence[str], matrix: np.ndarray) -> dict:
    """One training row in the reference's columns; chosen/rejected are [user, assistant] message lists."""
    k = len(responses)
    p = check_matrix(matrix, k)
    wins = p.sum(axis=1)  # [K]
    w, l = int(np.argmax(wins)), int(np.argmin(wins))
    return {
        "chosen": _conversation(prompt, responses[w]),
        "rejected": _conversation(prompt, responses[l]),
        "chosen_probs": float(p[w, l]),
        "chosen_probs_win": float(wins[w] / k),
        "chosen_probs_lose": float(wins[l] / k),
    }


def _conversation(prompt: str, response: str) -> list[dict[str, str]]:
    return [{"content": prompt, "role": "user"}, {"content": response, "role": "assistant"}]


class RewardScorer:
    """Any reward function r(prompt, response) -> float, turned into P by Bradley-Terry on the K rewards."""

    def __init__(self, reward: Callable[[str, str], float]):
        if not callable(reward):
            raise TypeError(f"reward must be callable (prompt, response) -> float, got {type(reward).__name__}")
        self.reward = reward

    def __call__(self, prompt: str, responses: Sequence[str]) -> np.ndarray:
        return bradley_terry([float(self.reward(prompt, r)) for r in responses])

    def __repr__(self) -> str:
        return f"RewardScorer({getattr(self.reward, '__qualname__', self.reward)!r})"


class PairRMScorer:
    """PairRM (llm-blender) as the reference uses it: aggregated pairwise scores s, then P = sigmoid(s_i - s_j).

    `blender.rank(..., return_scores=True)` returns s_i = mean_j (C[i, j] - C[j, i]) from all K(K-1)
    ordered comparisons. Needs `pip install gemma-jax[pairrm]` and the `llm-blender/PairRM` weights
    (downloaded from the HF hub on first use). Pass `blender` to reuse a loaded ranker.
    """

    def __init__(self, ranker: str = "llm-blender/PairRM", *, blender=None, batch_size: int = 1, device=None):
        if blender is None:
            try:
                llm_blender = importlib.import_module("llm_blender")
            except ImportError as e:
                raise ImportError("the PairRM scorer needs llm-blender: pip install 'gemma-jax[pairrm]'") from e
            blender = llm_blender.Blender()
            blender.loadranker(ranker, device=device)
        self.blender = blender
        self.batch_size = batch_size

    def __call__(self, prompt: str, responses: Sequence[str]) -> np.ndarray:
        scores = self.blender.rank(
            [prompt], [list(responses)], return_scores=True, batch_size=self.batch_size, disable_tqdm=True
        )
        return bradley_terry(np.asarray(scores, np.float64).reshape(-1))

    def __repr__(self) -> str:
        return "PairRMScorer()"


def reward_from_spec(spec: str) -> Callable[[str, str], float]:
    """'package.module:function' -> the function (the CLI's `--scorer reward:...`)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward spec {spec!r} must look like 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import reward function {spec!r}: {e}") from e
    if not callable(fn):
        raise ValueError(f"{spec!r} is not callable")
    return fn
