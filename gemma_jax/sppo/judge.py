"""LLM-as-judge preferences: a gemma_jax model reads both responses and we read its "A" vs "B" logits.

Each unordered pair is judged in both orders and the two answers averaged,
  P[i, j] = (P_A(i first, j second) + P_B(j first, i second)) / 2,
which cancels the judge's position bias and makes P[i, j] + P[j, i] = 1 exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_jax.sampler import bucket, left_pad
from gemma_jax.tokenizer import Tokenizer
from gemma_jax.transformer import Transformer

TEMPLATE = (
    "Which response answers the prompt better? Judge helpfulness, correctness and clarity.\n\n"
    "[Prompt]\n{prompt}\n\n[Response A]\n{a}\n\n[Response B]\n{b}\n\n"
    "Reply with one letter: A or B."
)


class JudgeScorer:
    """Scorer (prompt, K responses) -> [K, K] from the next-token logits of "A" and "B" after the judge prompt."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, template: str = TEMPLATE, max_length: int = 8192):
        ids = [tokenizer.encode(letter, add_bos=False) for letter in ("A", "B")]
        if any(len(i) != 1 for i in ids):
            raise ValueError(f"the judge needs 'A' and 'B' to be single tokens; this tokenizer gives {ids}")
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.letters = jnp.asarray([ids[0][0], ids[1][0]])
        graphdef, state = nnx.split(model)
        self._state = state
        self._last_logits = jax.jit(lambda s, t, m: nnx.merge(graphdef, s)(t, None, m)[0][:, -1])  # [n, V]

    def __call__(self, prompt: str, responses: Sequence[str]) -> np.ndarray:
        k = len(responses)
        pairs = [(i, j) for i in range(k) for j in range(k) if i != j]
        ids = [self._encode(prompt, responses[i], responses[j]) for i, j in pairs]
        tokens, mask = left_pad(ids, bucket(max(map(len, ids)), 1024), self.tokenizer.pad_id)
        logits = self._last_logits(self._state, jnp.asarray(tokens), jnp.asarray(mask))
        ab = logits[:, self.letters].astype(jnp.float32)  # [pairs, 2]
        first_wins = np.asarray(jax.nn.sigmoid(ab[:, 0] - ab[:, 1]), np.float64)  # P(A) with (i, j) shown as (A, B)
        shown = dict(zip(pairs, first_wins, strict=True))
        p = np.full((k, k), 0.5)
        for i, j in pairs:
            p[i, j] = (shown[i, j] + 1.0 - shown[j, i]) / 2
        return p

    def _encode(self, prompt: str, a: str, b: str) -> list[int]:
        text = self.template.format(prompt=prompt, a=a, b=b)
        ids = self.tokenizer.encode_chat([{"role": "user", "content": text}])
        if len(ids) > self.max_length:
            raise ValueError(
                f"a judge prompt has {len(ids)} tokens, over max_length={self.max_length}: "
                "raise max_length or generate shorter responses"
            )
        return ids

    def __repr__(self) -> str:
        return "JudgeScorer()"
