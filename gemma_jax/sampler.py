"""Text generation: bucketed, chunked prefill into a KV cache, then the whole decode loop inside jit.

The pieces are public so a server can run a continuous batch: `prefill` new requests together into
a prompt-sized scratch cache (`new_cache(batch, length)`), `start` their decode rows, `insert` them
into free rows of the running batch between `decode` calls (writing only the slots they use), and
read rows whose `done` flag is set; `decode` returns once dispatched, so the next call can be queued
before the last one's tokens are read. Penalties and log-probabilities are per-row data of the decode
state too; `prefill_scored` also scores each prompt token (echo with logprobs). `Sampler.generate` and
`Sampler.stream` are built from the same pieces. Every jitted function takes the model as (graphdef
static, state argument), so weights are inputs of the compiled program, not constants baked into it,
and compiled programs are shared by every Sampler over the same architecture.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from gemma_jax import kv_cache, sharding
from gemma_jax.kv_cache import EMPTY, KVCache, LayerCache
from gemma_jax.sampling import MAX_TOP_LOGPROBS, SamplingParams, penalize, sample, token_logprobs
from gemma_jax.tokenizer import Tokenizer
from gemma_jax.transformer import Transformer, split_groups

logger = logging.getLogger(__name__)

MIN_BUCKET = 32  # shortest padded prompt; buckets double up to the prefill chunk
NO_TOKEN = -1  # in decode output: the row produced nothing at this step
SCORE_CHUNK = 256  # longest prompt piece a scored prefill takes at once: its [T, V] float32 logits stay small
MIN_REQUEST_CACHE = 256  # fewest slots per row `generate` allocates; sizes grow 4x from here up to cache_length


@struct.dataclass
class Scores:
    """Raw-model log-probabilities (`sampling.token_logprobs`) of chosen tokens, with the top alternatives."""

    logprob: jax.Array  # [...] float32, of the chosen token
    top_ids: jax.Array  # [..., K] int32, the K most likely tokens, best first
    top_logprobs: jax.Array  # [..., K] float32

    @classmethod
    def of(cls, logits: jax.Array, tokens: jax.Array) -> Scores:
        """Scores of `tokens` [N] under `logits` [N, V]."""
        return cls(*token_logprobs(logits, tokens))


@struct.dataclass
class DecodeState:
    """Per-row decode slots, each [B]. A row with `done` set is finished or free and is skipped."""

    tokens: jax.Array  # [B] int32, the last sampled token: the next model input
    positions: jax.Array  # [B] int32, the position `tokens` will be written at
    done: jax.Array  # [B] bool
    generated: jax.Array  # [B] int32, tokens sampled so far (the stop token included)
    max_new_tokens: jax.Array  # [B] int32
    params: SamplingParams
    keys: jax.Array  # [B] PRNG keys, one per row; token i of a row draws with fold_in(key, i)
    counts: jax.Array  # [B, V] int32, how often the completion sampled each token (penalties)
    prompt: jax.Array  # [B, V] bool, the tokens of the row's prompt (repetition penalty)
    logprobs: jax.Array  # [B] bool, the row reports its tokens' Scores

    @classmethod
    def empty(cls, batch: int, vocab: int) -> DecodeState:
        """A batch of free rows over a vocabulary of `vocab` tokens."""

        def zeros():  # distinct buffers: the state is donated to the jitted steps
            return jnp.zeros((batch,), jnp.int32)

        return cls(
            tokens=zeros(),
            positions=zeros(),
            done=jnp.ones((batch,), bool),
            generated=zeros(),
            max_new_tokens=zeros(),
            params=SamplingParams.create(batch),
            keys=jax.random.split(jax.random.key(0), batch),
            counts=jnp.zeros((batch, vocab), jnp.int32),
            prompt=jnp.zeros((batch, vocab), bool),
            logprobs=jnp.zeros((batch,), bool),
        )


@dataclasses.dataclass(frozen=True)
class Completion:
    """One prompt's output. `token_ids` and `text` stop before the stop token."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop id was sampled) or "length" (max_new_tokens reached)


def bucket(length: int, chunk: int) -> int:
    """Padded prompt length: a power of two from MIN_BUCKET up to `chunk`, else a multiple of `chunk`."""
    if length > chunk:
        return -(-length // chunk) * chunk
    return min(chunk, max(MIN_BUCKET, 1 << (length - 1).bit_length()))


def request_cache_length(longest: int, max_new_tokens: int, chunk: int, cache_length: int) -> int:
    """Slots per row for one `generate` call: its longest prompt plus `max_new_tokens` (and its padded prompt),
    rounded up to MIN_REQUEST_CACHE times a power of four, at most `cache_length`.

    Creating a cache writes every slot (XLA has no uninitialized buffer): four rows of the 270M at 16k are 464
    MB, which cost a short request more than its prefill; a sliding layer's ring is as long as the cache up to
    its window, and a prefill chunk reads and writes its ring. Powers of four bound the programs to compile (four sizes:
    256, 1k, 4k, 16k); attention reads only the filled slots whatever the size.
    """
    need, size = max(longest + max_new_tokens, bucket(longest, chunk)), MIN_REQUEST_CACHE
    while size < need:
        size *= 4
    return min(cache_length, size)


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows right-aligned in [B, length]: (tokens, mask). The last column holds every row's last token."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for row, ids in enumerate(prompts):
        tokens[row, length - len(ids) :] = ids
        mask[row, length - len(ids) :] = True
    return tokens, mask


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _prefill_chunk(graphdef, state, cache, tokens, positions, mask):
    """Store one chunk [B, T] in the cache; return the logits of its last column [B, V]."""
    model = nnx.merge(graphdef, state)
    logits, cache = model(tokens, positions, mask, cache, last_only=True)
    return logits[:, 0], cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _prefill_chunk_scored(graphdef, state, cache, tokens, positions, mask, targets):
    """As `_prefill_chunk`, plus the Scores [B, T] of each column's next token `targets` [B, T]."""
    model = nnx.merge(graphdef, state)
    logits, cache = model(tokens, positions, mask, cache)
    b, t, v = logits.shape
    scores = Scores.of(logits.reshape(b * t, v), targets.reshape(b * t))
    return logits[:, -1], cache, jax.tree.map(lambda x: x.reshape(b, t, *x.shape[1:]), scores)


@jax.jit
def start(logits, lengths, max_new_tokens, params: SamplingParams, keys, stop_ids, prompt, logprobs) -> DecodeState:
    """Decode rows for prompts whose prefill gave `logits` [B, V]: samples each row's first token.

    `prompt` [B, V] marks each row's prompt tokens (repetition penalty), `logprobs` [B] the rows that report Scores.
    """
    batch = keys.shape[0]
    counts = jnp.zeros(prompt.shape, jnp.int32)
    first = sample(penalize(logits, params, counts, prompt), params, keys, jnp.zeros((batch,), jnp.int32))
    return DecodeState(
        tokens=first,
        positions=lengths.astype(jnp.int32),
        done=jnp.isin(first, stop_ids) | (max_new_tokens <= 1),
        generated=jnp.ones_like(first),
        max_new_tokens=max_new_tokens.astype(jnp.int32),
        params=params,
        keys=keys,
        counts=counts.at[jnp.arange(batch), first].add(1),
        prompt=prompt,
        logprobs=logprobs,
    )


_scores = jax.jit(Scores.of)


def _row(scores: Scores, row: int, start: int, stop: int) -> Scores:
    """Columns [start, stop) of one row of batched numpy Scores."""
    return jax.tree.map(lambda x: x[row, start:stop], scores)


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=(2, 3))
def _decode(graphdef, state, cache: KVCache, dstate: DecodeState, stop_ids, num_steps: int):
    """Up to `num_steps` decode steps in one `lax.while_loop`, ending early once every row is done.

    Returns (cache, dstate, tokens [B, num_steps], Scores [B, num_steps]) with NO_TOKEN where a row sampled
    nothing; the Scores are computed only in steps where some live row reports them (else zeros).
    """
    batch, vocab = dstate.counts.shape
    k = min(MAX_TOP_LOGPROBS, vocab)
    no_scores = Scores(jnp.zeros((batch,)), jnp.zeros((batch, k), jnp.int32), jnp.zeros((batch, k)))

    def cond(carry):
        step, _, ds, _, _ = carry
        return (step < num_steps) & ~jnp.all(ds.done)

    def body(carry):
        step, cache, ds, out, scores = carry
        model = nnx.merge(graphdef, state)
        live = ~ds.done  # [B]
        logits, cache = model(ds.tokens[:, None], ds.positions[:, None], live[:, None], cache)
        logits = logits[:, 0]
        token = sample(penalize(logits, ds.params, ds.counts, ds.prompt), ds.params, ds.keys, ds.generated)  # [B]
        new = jax.lax.cond(jnp.any(live & ds.logprobs), lambda: Scores.of(logits, token), lambda: no_scores)
        generated = ds.generated + live
        stop = jnp.isin(token, stop_ids) | (generated >= ds.max_new_tokens)
        ds = ds.replace(
            tokens=jnp.where(live, token, ds.tokens),
            positions=ds.positions + live,
            done=ds.done | (live & stop),
            generated=generated,
            counts=ds.counts.at[jnp.arange(batch), token].add(live.astype(jnp.int32)),
        )
        out = out.at[:, step].set(jnp.where(live, token, NO_TOKEN))
        scores = jax.tree.map(lambda all_, x: all_.at[:, step].set(x), scores, new)
        return step + 1, cache, ds, out, scores

    out = jnp.full((batch, num_steps), NO_TOKEN, jnp.int32)
    scores = jax.tree.map(lambda x: jnp.zeros((batch, num_steps, *x.shape[1:]), x.dtype), no_scores)
    _, cache, dstate, out, scores = jax.lax.while_loop(cond, body, (jnp.int32(0), cache, dstate, out, scores))
    return cache, dstate, out, scores


@jax.jit
def row_keys(seeds: jax.Array) -> jax.Array:
    """One PRNG key per row from its own seed [n] uint32: the key a batch of one from that seed gets in `start`."""
    return jax.vmap(lambda s: jax.random.split(jax.random.key(s), 1)[0])(seeds)


@functools.partial(jax.jit, donate_argnums=(0, 1))
def insert(cache: KVCache, dstate: DecodeState, new_cache: KVCache, new_state: DecodeState, rows):
    """Put started requests (their prefilled caches [n, ...] and states) into rows `rows` [n] of a running batch.

    `new_cache` may be shorter than `cache` (a prompt-sized scratch cache, see `Sampler.new_cache`): k and v
    are written in the slots it has only, and the rest of each row's positions are set EMPTY, so nothing of the
    row's previous request stays visible. An 8-bit cache's scales are written like its keys. A row index out of
    range (>= B) drops that row (batch padding). `rows` may be a scalar for one request.
    """
    rows = jnp.atleast_1d(rows)

    def layer(big: LayerCache, new: LayerCache) -> LayerCache:
        lead = (slice(None),) * (big.positions.ndim - 2)  # stacked groups: [G, B, ...]
        at, filled = (*lead, rows), slice(0, new.size)
        empty = jnp.full((*new.positions.shape[:-1], big.size - new.size), EMPTY, jnp.int32)

        def slots(x: jax.Array | None, y: jax.Array | None) -> jax.Array | None:  # k and scales: [.., B, K, *, S]
            return None if x is None else x.at[(*at, Ellipsis, filled)].set(y.astype(x.dtype), mode="drop")

        return LayerCache(
            k=slots(big.k, new.k),
            v=big.v.at[(*at, slice(None), filled)].set(new.v.astype(big.v.dtype), mode="drop"),  # [.., B, K, S, H]
            positions=big.positions.at[at].set(jnp.concatenate([new.positions, empty], -1), mode="drop"),
            k_scale=slots(big.k_scale, new.k_scale),
            v_scale=slots(big.v_scale, new.v_scale),
        )

    def put(x, r):
        return x.at[rows].set(r if r.dtype == x.dtype else r.astype(x.dtype), mode="drop")

    cache = jax.tree.map(layer, cache, new_cache, is_leaf=lambda x: isinstance(x, LayerCache))
    return cache, jax.tree.map(put, dstate, new_state)


def default_cache_dtype(compute_dtype: jnp.dtype, backend: str) -> jnp.dtype:
    """The compute dtype, except float32 for a sub-32-bit float on CPU: XLA's CPU backend has no bfloat16
    scatter and upcasts a bfloat16 buffer carried through a loop, so every decode step converted the whole
    cache to float32 and back (measured: 2b shape, batch 8, 16k cache, 1.6x the step time of a 1k cache)."""
    compute_dtype = jnp.dtype(compute_dtype)
    if backend == "cpu" and jnp.issubdtype(compute_dtype, jnp.floating) and compute_dtype.itemsize < 4:
        return jnp.dtype(jnp.float32)
    return compute_dtype


class Sampler:
    """Generates text from a `Transformer` with a KV cache of up to `cache_length` tokens per row.

    `cache_length` is the context: the most a row's prompt and completion may hold. `generate` and `stream`
    allocate what the request needs (`request_cache_length`); a server's batch (`new_cache`) takes all of it.
    Prompts longer than `prefill_chunk` are prefilled in chunks of that size, attending over the filled
    prefix and the chunk a key block at a time. Each decode call runs up to `decode_steps` steps
    (`stream_steps` when streaming) and stops early once every row is done, so one compile per (batch
    size, cache size) serves any `max_new_tokens`. The model's weights are captured when the Sampler is built.
    With a `mesh` (the one the model is sharded over), caches are created in their shardings and the
    jitted steps run under the mesh, so the model's sharding constraints apply. On CPU without a mesh the
    decode loop runs on its own copy of the layer weights, held apart per group (`transformer.split_groups`).
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        cache_length: int = 16384,
        prefill_chunk: int = 2048,
        cache_dtype: jnp.dtype | str | None = None,
        decode_steps: int = 64,
        stream_steps: int = 8,
        mesh: jax.sharding.Mesh | None = None,
    ):
        for name, value in (
            ("cache_length", cache_length),
            ("prefill_chunk", prefill_chunk),
            ("decode_steps", decode_steps),
            ("stream_steps", stream_steps),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} pieces but the model only {model.config.vocab_size}: "
                "is this the checkpoint's tokenizer?"
            )
        # "fp8" / "int8": 8 bits per key and value with per-token-per-head scales (kv_cache.py); unknown: ValueError
        self.cache_dtype = kv_cache.cache_dtype(cache_dtype or default_cache_dtype(model.dtype, jax.default_backend()))
        self.config = model.config
        self.tokenizer = tokenizer
        self.cache_length = cache_length
        self.prefill_chunk = prefill_chunk
        self.decode_steps = decode_steps
        self.stream_steps = stream_steps
        self.mesh = mesh
        self._graphdef, self._state = nnx.split(model)
        # The decode loop's model. XLA:CPU copies scanned weights out of their stack on every decode step, so
        # there the groups are held apart (a copy of the layer weights; `split_groups`). Prefill runs once per
        # chunk and keeps the scan, which compiles faster.
        if jax.default_backend() == "cpu" and mesh is None:
            self._decode_graphdef, self._decode_state = nnx.split(split_groups(model))
        else:
            self._decode_graphdef, self._decode_state = self._graphdef, self._state
        self._stop_ids = jnp.asarray(tokenizer.stop_ids, jnp.int32)

    # -- the pieces a server composes -------------------------------------------------------

    def new_cache(self, batch: int, length: int | None = None) -> KVCache:
        """An empty cache of `cache_length` slots per row, or of `length` (at most that): a prompt-sized scratch
        cache to prefill requests into before `insert` copies the slots they use into a running batch."""
        length = self.cache_length if length is None else min(length, self.cache_length)
        if self.mesh is None:
            return KVCache.create(self.config, batch, length, self.cache_dtype)
        return sharding.init_cache(self.config, batch, length, self.cache_dtype, self.mesh)

    def request_cache(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> KVCache:
        """The empty cache `generate` and `stream` use for `prompts` (token ids) and `max_new_tokens`: one row per
        prompt, `request_cache_length` slots."""
        longest = max(map(len, prompts))
        return self.new_cache(
            len(prompts), request_cache_length(longest, max_new_tokens, self.prefill_chunk, self.cache_length)
        )

    def prefill(self, cache: KVCache, prompts: Sequence[Sequence[int]]) -> tuple[jax.Array, KVCache]:
        """Write token-id prompts (one per cache row) into `cache`; return each row's next-token logits [B, V].

        Prompts are left-padded to a bucket, so there is one compile per (bucket, batch size).
        """
        logits, cache, _ = self._prefill(cache, prompts, score=False)
        return logits, cache

    def prefill_scored(
        self, cache: KVCache, prompts: Sequence[Sequence[int]]
    ) -> tuple[jax.Array, KVCache, list[Scores]]:
        """`prefill`, plus each prompt's Scores (numpy, [len - 1]): of its tokens after the first, each under the
        logits of the position before it. Chunks of at most SCORE_CHUNK columns bound the [T, V] logits."""
        logits, cache, scores = self._prefill(cache, prompts, score=True)
        end = scores.logprob.shape[1] - 1  # the last column scores the token after the prompt: not a prompt's
        return logits, cache, [_row(scores, row, end - len(p) + 1, end) for row, p in enumerate(prompts)]

    def _prefill(self, cache: KVCache, prompts: Sequence[Sequence[int]], score: bool):
        self._check_lengths(prompts, max_new_tokens=0)
        longest = max(map(len, prompts))
        padded = bucket(longest, self.prefill_chunk)
        chunk = self._chunk(padded, score)
        logger.info("prefill: batch %d, longest prompt %d -> bucket %d (%d chunk(s) of %d)",
                    len(prompts), longest, padded, padded // chunk, chunk)  # fmt: skip
        tokens, mask = left_pad(prompts, padded, self.tokenizer.pad_id)
        positions = np.where(mask, np.cumsum(mask, axis=1) - 1, EMPTY).astype(np.int32)
        targets = np.concatenate([tokens[:, 1:], np.zeros_like(tokens[:, :1])], axis=1)  # each column's next token
        pieces = []
        with sharding.on_mesh(self.mesh):
            for s in range(0, padded, chunk):
                cols = slice(s, s + chunk)
                args = (self._graphdef, self._state, cache, tokens[:, cols], positions[:, cols], mask[:, cols])
                if score:
                    logits, cache, piece = _prefill_chunk_scored(*args, targets[:, cols])
                    pieces.append(piece)
                else:
                    logits, cache = _prefill_chunk(*args)
        scores = jax.tree.map(lambda *x: np.concatenate(x, axis=1), *jax.device_get(pieces)) if score else None
        return logits, cache, scores

    def _chunk(self, padded: int, score: bool) -> int:
        """The prefill's piece for prompts padded to `padded`; a scored one takes the largest piece that tiles the
        chunk and keeps its [T, V] logits small."""
        chunk = min(padded, self.prefill_chunk)
        return max(d for d in range(1, min(chunk, SCORE_CHUNK) + 1) if chunk % d == 0) if score else chunk

    def compile_prefill(self, batch: int, length: int, *, score: bool = False) -> tuple[jax.Array, KVCache]:
        """Compile, without running, the prefill of `batch` prompts of bucket `length` into `new_cache(batch, length)`
        (`score`: `prefill_scored`'s): a server compiles every shape it may need at start-up, and running each would
        cost a prefill of every shape (minutes on a CPU). Returns what `prefill` would, zero logits [batch, V] and an
        empty cache, placed as its outputs are, so the steps after it (`start`, `insert`) compile for the same
        placements."""
        tokens = np.zeros((batch, self._chunk(length, score)), np.int32)
        cache = self.new_cache(batch, length)
        logits = jnp.zeros((batch, self.config.vocab_size), jnp.float32)
        # A jitted call's outputs are committed to their placement when an input is (weights restored from a
        # checkpoint or over a mesh are), and a committed input is a different program from an uncommitted one.
        committed = any(x.committed for x in jax.tree.leaves(self._state))
        with sharding.on_mesh(self.mesh):
            for _ in range(1 if tokens.shape[1] == length else 2):  # a second chunk reads the first one's output cache
                args = (self._graphdef, self._state, cache, tokens, tokens, tokens > 0)
                lowered = _prefill_chunk_scored.lower(*args, tokens) if score else _prefill_chunk.lower(*args)
                placements = lowered.compile().output_shardings[:2]
                logits, cache = jax.device_put((logits, cache), placements) if committed else (logits, cache)
        return logits, cache

    def start(
        self,
        logits: jax.Array,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int | Sequence[int],
        params: SamplingParams,
        seed: int | Sequence[int],
        *,
        logprobs: bool | Sequence[bool] = False,
    ) -> DecodeState:
        """Decode rows for prefilled `prompts`: the first token sampled. Budgets are one for all rows or one per
        row; `seed` gives one PRNG key per row from one seed, or each row its own (as alone with that seed);
        `logprobs` (for all rows or per row): the rows that report their tokens' Scores from `decode`."""
        batch = len(prompts)
        if isinstance(seed, int):
            keys = jax.random.split(jax.random.key(seed), batch)
        else:  # keys take a seed's low 32 bits, as jax.random.key does for a larger int
            keys = row_keys(np.asarray([s & 0xFFFFFFFF for s in seed], np.uint32))
        lengths = np.asarray([len(p) for p in prompts], np.int32)
        budgets = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (batch,))
        reports = np.broadcast_to(np.asarray(logprobs, bool), (batch,))
        seen = np.zeros((batch, self.config.vocab_size), bool)  # built on the host: no compile per prompt length
        for row, p in enumerate(prompts):
            seen[row, p] = True
        with sharding.on_mesh(self.mesh):
            return start(logits, lengths, budgets, params, keys, self._stop_ids, seen, reports)

    def scores(self, logits: jax.Array, tokens: jax.Array) -> Scores:
        """The Scores of `tokens` [B] under `logits` [B, V]: started rows' first tokens, from their prefill. Returns
        once dispatched (device arrays), like `decode`."""
        with sharding.on_mesh(self.mesh):
            return _scores(logits, tokens)

    def decode(
        self, cache: KVCache, dstate: DecodeState, num_steps: int
    ) -> tuple[KVCache, DecodeState, jax.Array, Scores]:
        """Run up to `num_steps` steps (static: one compile per value): tokens [B, num_steps] (NO_TOKEN = none) and
        their Scores ([B, num_steps]; set for the rows that report them).

        Returns as soon as the call is dispatched; tokens and Scores stay on the device until read (`np.asarray`,
        `jax.device_get` wait), so a server can dispatch the next call first and the device never waits on the host.
        """
        with sharding.on_mesh(self.mesh):
            return _decode(self._decode_graphdef, self._decode_state, cache, dstate, self._stop_ids, num_steps)

    # -- whole requests ---------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        seed: int = 0,
        chat: bool = False,
    ) -> list[Completion]:
        """Complete a batch of prompts (text, or token ids used as given); `chat` wraps text in the chat template."""
        ids, params = self._request(prompts, chat, max_new_tokens, temperature, top_k, top_p, min_p)
        rows = [[] for _ in ids]
        for new in self._run(ids, max_new_tokens, params, seed, self.decode_steps):
            for row, token in zip(rows, new, strict=True):
                row.extend(t for t in token.tolist() if t != NO_TOKEN)
        return [self._completion(row) for row in rows]

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        seed: int = 0,
        chat: bool = False,
    ) -> Iterator[str]:
        """Yield the completion of one prompt as text pieces, `stream_steps` tokens per jit call."""
        ids, params = self._request([prompt], chat, max_new_tokens, temperature, top_k, top_p, min_p)
        decoder = self.tokenizer.stream_decoder()
        stop = set(self.tokenizer.stop_ids)
        for new in self._run(ids, max_new_tokens, params, seed, self.stream_steps):
            text = decoder.push(t for t in new[0].tolist() if t != NO_TOKEN and t not in stop)
            if text:
                yield text
        if text := decoder.flush():
            yield text

    def _run(self, ids, max_new_tokens, params, seed, steps) -> Iterator[np.ndarray]:
        """Prefill, start, then decode `steps` at a time until every row is done: yields new tokens [B, n]."""
        logits, cache = self.prefill(self.request_cache(ids, max_new_tokens), ids)
        dstate = self.start(logits, ids, max_new_tokens, params, seed)
        yield np.asarray(dstate.tokens)[:, None]
        while not bool(jnp.all(dstate.done)):
            cache, dstate, out, _ = self.decode(cache, dstate, steps)
            yield np.asarray(out)

    def _encode(self, prompts: Sequence[str | Sequence[int]], chat: bool) -> list[list[int]]:
        if isinstance(prompts, str) or not len(prompts):
            raise ValueError("prompts must be a non-empty list of strings or token-id lists")
        ids = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if not p:
                    raise ValueError(f"prompt {i} is empty")
                msgs = [{"role": "user", "content": p}]
                ids.append(self.tokenizer.encode_chat(msgs) if chat else self.tokenizer.encode(p))
            else:
                ids.append([int(t) for t in p])
        return ids

    def _request(
        self, prompts, chat: bool, max_new_tokens: int, temperature, top_k, top_p, min_p
    ) -> tuple[list[list[int]], SamplingParams]:
        """Token ids and per-row sampling params of a request, every setting checked before any compile."""
        ids = self._encode(prompts, chat)
        params = SamplingParams.create(len(ids), temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        self._check_lengths(ids, max_new_tokens)
        return ids, params

    def _check_lengths(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        """Everything a row will hold must fit its cache; checked before anything compiles."""
        vocab = self.config.vocab_size
        for i, p in enumerate(prompts):
            if not len(p):
                raise ValueError(f"prompt {i} is empty")
            if min(p) < 0 or max(p) >= vocab:
                raise ValueError(f"prompt {i} has token ids outside [0, {vocab})")
            if len(p) + max_new_tokens > self.cache_length:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it needs "
                    f"{len(p) + max_new_tokens} cache slots but cache_length is {self.cache_length}: "
                    "shorten the prompt, lower max_new_tokens or raise cache_length"
                )

    def _completion(self, tokens: list[int]) -> Completion:
        stopped = bool(tokens) and tokens[-1] in self.tokenizer.stop_ids
        if stopped:
            tokens = tokens[:-1]
        return Completion(self.tokenizer.decode(tokens), tokens, "stop" if stopped else "length")
