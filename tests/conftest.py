"""Shared fixtures: HF oracle models built from our configs, with weights random enough to matter."""

from __future__ import annotations

import os

# Tests run on the CPU with 8 virtual devices (sharding tests use them; others see device 0).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import numpy as np
import pytest

import gemma_jax as gj


def hf_model(config: gj.GemmaConfig, seed: int = 0):
    """A float32 eager-attention `Gemma2ForCausalLM` with random weights (norms included).

    HF's default init (std 0.02, zero norms) gives near-zero logits that would pass any tolerance;
    larger weights push scores past the softcaps and make every term count.
    """
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hf_config = transformers.Gemma2Config(**config.to_hf(), attn_implementation="eager")
    model = transformers.Gemma2ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.3 if "norm" in name else (0.5 if "embed" in name else 0.15)
            p.normal_(0.0, std)
    return model


def hf_state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray | None = None, positions: np.ndarray | None = None):
    import torch

    kwargs = {}
    if mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(mask.astype(np.int64))
    if positions is not None:
        kwargs["position_ids"] = torch.as_tensor(positions.astype(np.int64))
    with torch.no_grad():
        return model(torch.as_tensor(tokens.astype(np.int64)), **kwargs).logits.float().numpy()


def left_padded(rng: np.random.Generator, lengths: list[int], vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Random token rows of the given lengths, left-padded with id 0 to the longest; returns (tokens, mask)."""
    t = max(lengths)
    tokens = np.zeros((len(lengths), t), np.int32)
    mask = np.zeros((len(lengths), t), bool)
    for i, n in enumerate(lengths):
        tokens[i, t - n :] = rng.integers(1, vocab, n)
        mask[i, t - n :] = True
    return tokens, mask
