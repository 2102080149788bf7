"""SPPO losses on summed response log-probs, as the reference trainer (`SPPOTrainer.sppo_loss`) computes them.

The policy is regressed onto the exact multiplicative-weights update of the paper:
  log(pi(y|x) / pi_ref(y|x))  ->  eta * (P(y > pi_ref | x) - 1/2),   eta = 1 / beta.
Everything here runs in float32 whatever the model's compute dtype: with eta = 1000 the targets reach
+-400 nats and the loss is ~1e4 at step 0 (expected, see the spec), which bfloat16 cannot resolve.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

LOSS_TYPES = ("sppo", "sppo_single", "sppo_hard")


def sequence_logps(
    logits: jax.Array,  # [B, T, V]
    tokens: jax.Array,  # [B, T] int
    loss_mask: jax.Array,  # [B, T] bool, True on the response tokens that are scored
) -> jax.Array:
    """Sum over scored tokens t of log p(tokens[t] | tokens[:t]): [B] float32.

    The one-position shift of causal LMs: logits at t predict token t+1, so the mask and labels are
    read from position 1 on (HF `get_batch_logps` with `average_log_prob=False`).
    """
    logits = logits[:, :-1].astype(jnp.float32)  # [B, T-1, V]
    labels = tokens[:, 1:]
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]  # [B, T-1]
    token_logps = picked - jax.nn.logsumexp(logits, axis=-1)
    return jnp.sum(jnp.where(loss_mask[:, 1:], token_logps, 0.0), axis=-1)


class PairLogps(NamedTuple):
    """Summed response log-probs of a batch of pairs, each [B]."""

    policy_chosen: jax.Array
    policy_rejected: jax.Array
    reference_chosen: jax.Array
    reference_rejected: jax.Array


class PairProbs(NamedTuple):
    """The preference columns of the training data, each [B]: P(y_w > y_l), P(y_w > pi), P(y_l > pi)."""

    chosen_probs: jax.Array
    chosen_probs_win: jax.Array
    chosen_probs_lose: jax.Array


def sppo_losses(logps: PairLogps, probs: PairProbs, *, beta: float, loss_type: str = "sppo") -> jax.Array:
    """Per-pair loss [B] float32; the training loss is its mean over the batch.

    sppo:        ((lr_w - eta (p_win - 1/2))^2 + (lr_l - eta (p_lose - 1/2))^2) / 2
    sppo_single: ((lr_w - eta (p_wl - 1/2))^2 + (lr_l + eta (p_wl - 1/2))^2) / 2
    sppo_hard:   (lr_w - eta/2)^2 + (lr_l + eta/2)^2           (TRL's version, no /2)
    with lr_* = policy - reference log-prob of the chosen (w) / rejected (l) response.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r} is not one of {LOSS_TYPES}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0 (eta = 1/beta), got {beta}")
    f32 = jnp.float32
    eta = 1.0 / beta
    ratio_w = logps.policy_chosen.astype(f32) - logps.reference_chosen.astype(f32)
    ratio_l = logps.policy_rejected.astype(f32) - logps.reference_rejected.astype(f32)
    if loss_type == "sppo":
        loss_w = (ratio_w - eta * (probs.chosen_probs_win.astype(f32) - 0.5)) ** 2
        loss_l = (ratio_l - eta * (probs.chosen_probs_lose.astype(f32) - 0.5)) ** 2
        return (loss_w + loss_l) / 2
    if loss_type == "sppo_single":
        target = eta * (probs.chosen_probs.astype(f32) - 0.5)
        return ((ratio_w - target) ** 2 + (ratio_l + target) ** 2) / 2
    return (ratio_w - 0.5 * eta) ** 2 + (ratio_l + 0.5 * eta) ** 2


def reward_metrics(logps: PairLogps, *, beta: float) -> dict[str, jax.Array]:
    """The reference's logged rewards: beta * log-ratio of chosen and rejected, their margin and accuracy."""
    chosen = beta * (logps.policy_chosen - logps.reference_chosen).astype(jnp.float32)
    rejected = beta * (logps.policy_rejected - logps.reference_rejected).astype(jnp.float32)
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).astype(jnp.float32).mean(),
        "logps/chosen": logps.policy_chosen.astype(jnp.float32).mean(),
        "logps/rejected": logps.policy_rejected.astype(jnp.float32).mean(),
    }
