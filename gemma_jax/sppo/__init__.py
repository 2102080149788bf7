"""SPPO (Self-Play Preference Optimization, arXiv 2405.00675) for gemma_jax: data, scorers, loss, training.

`python -m gemma_jax.sppo --help` runs the recipe; docs/sppo.md describes it and the reference's quirks.
"""

from gemma_jax.sppo.lora import LoRAParam, apply_lora, merge_lora
from gemma_jax.sppo.loss import LOSS_TYPES, PairLogps, PairProbs, reward_metrics, sequence_logps, sppo_losses
from gemma_jax.sppo.preference import COLUMNS, PairRMScorer, RewardScorer, Scorer, bradley_terry, pair_row
from gemma_jax.sppo.trainer import TrainConfig, TrainResult, make_optimizer, train

__all__ = [
    "COLUMNS",
    "LOSS_TYPES",
    "LoRAParam",
    "PairLogps",
    "PairProbs",
    "PairRMScorer",
    "RewardScorer",
    "Scorer",
    "TrainConfig",
    "TrainResult",
    "apply_lora",
    "bradley_terry",
    "make_optimizer",
    "merge_lora",
    "pair_row",
    "reward_metrics",
    "sequence_logps",
    "sppo_losses",
    "train",
]
