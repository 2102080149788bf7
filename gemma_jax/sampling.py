"""Next-token choice: penalties, greedy, temperature, top-k, top-p and min-p, with every parameter per row;
and the log-probabilities an evaluation client reads.

Parameters are arrays, not static arguments, so one compiled decode step serves rows with
different settings (a server mixes requests in one batch). Penalties run first (`penalize`, vLLM's
order: repetition, then frequency and presence), then the filters in HF's order (temperature, top-k,
top-p, min-p); a row with temperature 0 is greedy.

Log-probabilities (`token_logprobs`) are the raw model's: log_softmax of the logits before penalties,
temperature and filters, as vLLM reports them by default and as lm-eval-harness needs for loglikelihoods.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

MAX_TOP_LOGPROBS = 20  # most alternatives per token (OpenAI's bound); the compiled top-k width


@struct.dataclass
class SamplingParams:
    """Per-row settings, each [B]: temperature 0 = greedy; top_k 0, top_p 1 and min_p 0 disable a filter;
    presence and frequency penalty 0 and repetition penalty 1 disable a penalty."""

    temperature: jax.Array  # [B] float32
    top_k: jax.Array  # [B] int32
    top_p: jax.Array  # [B] float32
    min_p: jax.Array  # [B] float32
    presence_penalty: jax.Array  # [B] float32
    frequency_penalty: jax.Array  # [B] float32
    repetition_penalty: jax.Array  # [B] float32

    @classmethod
    def create(
        cls,
        batch: int,
        *,
        temperature: float | Sequence[float] = 0.0,
        top_k: int | Sequence[int] = 0,
        top_p: float | Sequence[float] = 1.0,
        min_p: float | Sequence[float] = 0.0,
        presence_penalty: float | Sequence[float] = 0.0,
        frequency_penalty: float | Sequence[float] = 0.0,
        repetition_penalty: float | Sequence[float] = 1.0,
    ) -> SamplingParams:
        """Validated per-row arrays from scalars (broadcast to every row) or per-row sequences."""
        given = {
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "min_p": min_p,
            "presence_penalty": presence_penalty,
            "frequency_penalty": frequency_penalty,
            "repetition_penalty": repetition_penalty,
        }
        values = {
            k: np.broadcast_to(np.asarray(v, np.int32 if k == "top_k" else np.float32), (batch,))
            for k, v in given.items()
        }
        check(**values)
        return cls(**{k: jnp.asarray(v) for k, v in values.items()})


def check(
    temperature, top_k, top_p, min_p, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0
) -> None:
    """Raise ValueError naming the first out-of-range setting (scalars or arrays)."""
    if np.any(np.asarray(temperature) < 0) or not np.all(np.isfinite(temperature)):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if np.any(np.asarray(top_k) < 0):
        raise ValueError(f"top_k must be >= 0 (0 = no top-k filter), got {top_k}")
    top_p = np.asarray(top_p)
    if np.any(top_p <= 0) or np.any(top_p > 1):
        raise ValueError(f"top_p must be in (0, 1] (1 = no top-p filter), got {top_p}")
    min_p = np.asarray(min_p)
    if np.any(min_p < 0) or np.any(min_p > 1):
        raise ValueError(f"min_p must be in [0, 1] (0 = no min-p filter), got {min_p}")
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        value = np.asarray(value)
        if not np.all(np.isfinite(value)) or np.any(np.abs(value) > 2):
            raise ValueError(f"{name} must be in [-2, 2] (0 = no penalty), as OpenAI's, got {value}")
    repetition_penalty = np.asarray(repetition_penalty)
    if not np.all(np.isfinite(repetition_penalty)) or np.any(repetition_penalty <= 0):
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = no penalty), got {repetition_penalty}")


def penalize(logits: jax.Array, params: SamplingParams, counts: jax.Array, prompt: jax.Array) -> jax.Array:
    """Logits [B, V] float32 with each row's penalties applied; unchanged (and no work) when no row has any.

    `counts` [B, V] holds how often each token was sampled in the completion so far, `prompt` [B, V]
    (bool) which tokens the prompt holds. As vLLM: the repetition penalty (HF's definition) divides the
    positive logits and multiplies the negative ones of tokens seen in the prompt or the completion; then
    OpenAI's penalties subtract `count * frequency_penalty + (count > 0) * presence_penalty`.
    """

    def apply() -> jax.Array:
        seen = prompt | (counts > 0)
        rep = params.repetition_penalty[:, None]
        out = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
        out = out - counts * params.frequency_penalty[:, None]
        return out - (counts > 0) * params.presence_penalty[:, None]

    active = (params.presence_penalty != 0) | (params.frequency_penalty != 0) | (params.repetition_penalty != 1)
    return jax.lax.cond(jnp.any(active), apply, lambda: logits.astype(jnp.float32))


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The raw model's log-probabilities: of `tokens` [N] under `logits` [N, V], and the MAX_TOP_LOGPROBS most
    likely tokens: (logprob [N] float32, top ids [N, K] int32, top logprobs [N, K] float32), best first."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, None].astype(jnp.int32), axis=-1)[:, 0]
    top, ids = jax.lax.top_k(logp, min(MAX_TOP_LOGPROBS, logp.shape[-1]))
    return chosen, ids.astype(jnp.int32), top


def sample(logits: jax.Array, params: SamplingParams, keys: jax.Array, counter: jax.Array | None = None) -> jax.Array:
    """Tokens [B] int32 from logits [B, V] float32, with one PRNG key per row (keys [B]).

    With `counter` [B] (tokens a row has sampled so far), row r draws with fold_in(keys[r], counter[r]):
    a decode loop then carries one fixed key per row, and an all-greedy batch derives no keys at all.
    The sort over the vocabulary (262k entries for Gemma 3) runs only when some row uses top-k,
    top-p or min-p; a row's token depends only on its own settings and key, never on its batch mates.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filters = (params.top_k > 0) | (params.top_p < 1) | (params.min_p > 0)  # [B]

    def stochastic() -> jax.Array:
        step_keys = keys if counter is None else jax.vmap(jax.random.fold_in)(keys, counter)
        plain = _sample_plain(logits, params, step_keys)
        filtered = jax.lax.cond(
            jnp.any(filters & (params.temperature > 0)),
            lambda: _sample_filtered(logits, params, step_keys),
            lambda: plain,
        )
        return jnp.where(params.temperature == 0, greedy, jnp.where(filters, filtered, plain))

    return jax.lax.cond(jnp.all(params.temperature == 0), lambda: greedy, stochastic)


def filtered_logits(logits: jax.Array, params: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """Tempered logits sorted descending [B, V] with filtered entries at -inf, and their token ids [B, V]."""
    temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)
    scaled = logits.astype(jnp.float32) / temperature[:, None]
    order = jnp.argsort(-scaled, axis=-1)  # [B, V]
    scaled = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(scaled.shape[-1])[None, :]  # [1, V]
    k = params.top_k[:, None]
    scaled = jnp.where((k > 0) & (rank >= k), -jnp.inf, scaled)
    probs = jax.nn.softmax(scaled, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, V] probability of the better-ranked tokens
    scaled = jnp.where((mass_before >= params.top_p[:, None]) & (rank > 0), -jnp.inf, scaled)
    probs = jax.nn.softmax(scaled, axis=-1)
    scaled = jnp.where(probs < params.min_p[:, None] * probs[:, :1], -jnp.inf, scaled)
    return scaled, order


def _sample_plain(logits: jax.Array, params: SamplingParams, keys: jax.Array) -> jax.Array:
    """Sample from softmax(logits / temperature), no filter and no sort."""
    temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)
    scaled = logits.astype(jnp.float32) / temperature[:, None]
    return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)


def _sample_filtered(logits: jax.Array, params: SamplingParams, keys: jax.Array) -> jax.Array:
    scaled, order = filtered_logits(logits, params)
    choice = jax.vmap(jax.random.categorical)(keys, scaled)  # [B] rank of the chosen token
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
