"""Continuous batching: a fixed batch of decode rows that requests join and leave between decode calls.

One asyncio task (the scheduler) owns the bookkeeping and runs every JAX call on a single worker
thread, so the event loop keeps serving HTTP while the device works. Each iteration it
  1. admits waiting requests into free rows: `Sampler.prefill` into a one-row cache, `start`
     (the first token), `insert` into the batch;
  2. runs `decode_steps` steps for all rows at once (`Sampler.decode`), first marking done the rows
     whose request ended on the host (cancelled, or a stop string matched);
  3. hands each request its new tokens as text, and frees the rows that finished.
Sampling settings, penalties, logprob requests, seeds and token budgets are per-row arrays of the decode
state, so requests with any settings share one compiled program; only a new prompt-length bucket compiles.
Log-probabilities are the raw model's (log_softmax of its logits, before penalties, temperature and filters).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import secrets
import time
from collections.abc import Sequence

import numpy as np
from prometheus_client import CollectorRegistry

from gemma_jax.kv_cache import KVCache
from gemma_jax.sampler import NO_TOKEN, DecodeState, Sampler, Scores, insert
from gemma_jax.sampling import MAX_TOP_LOGPROBS, SamplingParams, check
from gemma_jax.serve.metrics import Metrics
from gemma_jax.tokenizer import StreamDecoder

logger = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """Every slot is busy and the waiting queue is full: retry later (HTTP 429)."""


class EngineClosed(RuntimeError):
    """The engine is shutting down or has stopped (HTTP 503)."""


class RequestFailed(RuntimeError):
    """The request failed inside the engine; other requests are unaffected (HTTP 500)."""


@dataclasses.dataclass(frozen=True)
class GenerationParams:
    """One request's settings: temperature 0 = greedy; top_k 0, top_p 1, min_p 0 disable a filter; presence and
    frequency penalty 0 (OpenAI's) and repetition penalty 1 (HF's) disable a penalty (see sampling.penalize)."""

    max_tokens: int  # 0: nothing is generated (the prompt's logprobs alone, for a scoring client)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    stop: tuple[str, ...] = ()  # strings that end the completion (not included in it)
    seed: int | None = None  # None: a fresh random seed
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # each sampled token's logprob, with this many alternatives; None: none
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (echo); None: the prompt is not scored

    def sampling(self) -> dict[str, float]:
        """The settings a row's SamplingParams holds, by their names there."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(SamplingParams)}


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A token's raw-model log-probability and its `top` alternatives (token id, logprob), best first.
    `logprob` is None for a prompt's first token: nothing precedes it."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class Output:
    """A step of one completion: the new text, tokens sampled so far, and on the last one why it ended;
    with logprobs asked, those of the tokens behind `text`, and on the first Output the prompt's."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None  # "stop" | "length" on the last Output
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


def token_logprobs(tokens: Sequence[int], scores: Scores, top: int) -> list[TokenLogprob]:
    """TokenLogprobs of `tokens` from their numpy Scores [len(tokens)], keeping `top` alternatives each."""
    return [
        TokenLogprob(int(t), float(lp), tuple(zip(ids[:top].tolist(), tops[:top].tolist(), strict=True)))
        for t, lp, ids, tops in zip(tokens, scores.logprob, scores.top_ids, scores.top_logprobs, strict=True)
    ]


class StopStrings:
    """Cuts streamed text at the first stop string, holding back a tail that may be the start of one."""

    def __init__(self, stops: Sequence[str]):
        self._stops = tuple(stops)
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        text = self._held + text
        hits = [i for s in self._stops if (i := text.find(s)) >= 0]
        if hits:
            self._held = ""
            return text[: min(hits)], True
        # The longest tail of `text` that a stop string starts with; no earlier start can still match.
        keep = max(
            (k for s in self._stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])),
            default=0,
        )
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class _Job:
    """One completion's host-side state, from submission to its last Output."""

    def __init__(self, handle: Handle, index: int, prompt: list[int], params: GenerationParams, decoder: StreamDecoder):
        self.handle, self.index, self.prompt, self.params = handle, index, prompt, params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.decoder = decoder
        self.stops = StopStrings(params.stop)
        self.generated = 0
        self.prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # set at admission when asked
        self.row: int | None = None
        self.finished = False
        self.cancelled = False
        self.submitted = time.perf_counter()

    def feed(
        self, tokens: Sequence[int], stop_ids: frozenset[int], row_done: bool, logprobs: Sequence[TokenLogprob] = ()
    ) -> Output | None:
        """Take newly sampled tokens (and their logprobs, when asked); return the Output to deliver (None when
        there is nothing new). The logprobs go out with the tokens that make the text: not a stop id's."""
        first = self.generated == 0
        pieces, kept, reason, hit = [], [], None, False
        for i, token in enumerate(tokens):
            self.generated += 1
            if token in stop_ids:
                reason = "stop"
                break
            kept.extend(logprobs[i : i + 1])
            text, hit = self.stops.push(self.decoder.push([token]))
            pieces.append(text)
            if hit:
                reason = "stop"
                break
        if reason is None and (row_done or self.generated >= self.params.max_tokens):
            reason = "length"
        if reason is not None and not hit:  # the decoder's and the stop matcher's held-back text goes out
            text, hit = self.stops.push(self.decoder.flush())
            pieces.append(text if hit else text + self.stops.flush())
            reason = "stop" if hit else reason
        self.finished = reason is not None
        text = "".join(pieces)
        if not text and not kept and reason is None and not first:  # the first always goes out: it opens the stream
            return None
        return Output(text, self.generated, reason, tuple(kept), self.prompt_logprobs if first else None)


class Handle:
    """The completions of one submission (prompts x choices): async-iterate `(index, Output)` until all finished."""

    def __init__(self, engine: Engine, size: int):
        self._engine = engine
        self._queue: asyncio.Queue = asyncio.Queue()
        self._open = size
        self.jobs: list[_Job] = []

    def __aiter__(self) -> Handle:
        return self

    async def __anext__(self) -> tuple[int, Output]:
        if not self._open:
            raise StopAsyncIteration
        index, item = await self._queue.get()
        if isinstance(item, BaseException):
            self.cancel()
            self._open = 0
            raise item
        if item.finish_reason is not None:
            self._open -= 1
        return index, item

    def cancel(self) -> None:
        """Abandon every unfinished completion; their slots are freed before the next decode call."""
        for job in self.jobs:
            self._engine._cancel(job)

    def _put(self, job: _Job, item: Output | BaseException) -> None:
        self._queue.put_nowait((job.index, item))


class Engine:
    """Serves completions from `slots` decode rows; `submit` from the event loop that runs `start()`.

    At most `slots + max_queue` completions are in flight; more raise `QueueFull`. `decode_steps`
    decode steps run per call: fewer make joins and streaming smoother, more cut per-call overhead.
    """

    def __init__(
        self,
        sampler: Sampler,
        *,
        slots: int = 16,
        decode_steps: int = 4,
        max_queue: int = 128,
        registry: CollectorRegistry | None = None,
    ):
        for name, value, low in (("slots", slots, 1), ("decode_steps", decode_steps, 1), ("max_queue", max_queue, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.sampler = sampler
        self.slots, self.decode_steps, self.max_queue = slots, decode_steps, max_queue
        self.metrics = Metrics(slots, registry)
        self._cache = sampler.new_cache(slots)  # over the sampler's mesh, if any, in its shardings
        self._dstate = DecodeState.empty(slots, sampler.config.vocab_size)
        self._stop_ids = frozenset(sampler.tokenizer.stop_ids)
        self._rows: list[_Job | None] = [None] * slots
        self._pending: collections.deque[_Job] = collections.deque()
        self._in_flight = 0
        self._live: set[_Job] = set()  # submitted, not yet finished
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gemma-jax-engine")
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False

    # -- lifecycle ------------------------------------------------------------------------------

    def warmup(self) -> None:
        """Compile prefill (shortest bucket), start, insert and decode before the first request (blocking)."""
        prompt = [self.sampler.tokenizer.bos_id]
        logits, row_cache = self.sampler.prefill(self.sampler.new_cache(1), [prompt])
        row_state = self.sampler.start(logits, [prompt], 1, SamplingParams.create(1), 0)  # done at once
        self._cache, self._dstate = insert(self._cache, self._dstate, row_cache, row_state, 0)
        self._decode(np.zeros(self.slots, bool))

    def start(self) -> None:
        """Start the scheduler on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._schedule(), name="gemma-jax-scheduler")

    def drain(self) -> None:
        """Stop taking requests (`submit` raises EngineClosed); the ones in flight go on."""
        self._closing = True
        self._wake.set()

    def abort(self, reason: str) -> None:
        """End each request in flight with RequestFailed(reason) (a drain deadline passed); frees their rows."""
        for job in [job for job in self._live if not job.cancelled]:
            job.handle._put(job, RequestFailed(reason))
            self._cancel(job)

    async def close(self) -> None:
        """Stop taking requests, finish the ones in flight, then stop the scheduler and its worker."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._worker.shutdown()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._closing

    @property
    def capacity(self) -> int:
        return self.slots + self.max_queue

    # -- requests -------------------------------------------------------------------------------

    def check(self, prompt: Sequence[int], params: GenerationParams) -> None:
        """Raise ValueError naming what is wrong with a request, before it is queued."""
        if not prompt:
            raise ValueError("the prompt is empty")
        vocab = self.sampler.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if not isinstance(params.max_tokens, int) or params.max_tokens < 0:
            raise ValueError(f"max_tokens must be an integer >= 0 (0: the prompt only), got {params.max_tokens!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and not (isinstance(value, int) and 0 <= value <= MAX_TOP_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_TOP_LOGPROBS}] or None, got {value!r}")
        context = self.sampler.cache_length
        if len(prompt) >= context:
            raise ValueError(
                f"The prompt has {len(prompt)} tokens but this model's maximum context length is {context} "
                "(prompt and completion together): shorten the prompt"
            )
        if len(prompt) + params.max_tokens > context:
            raise ValueError(
                f"This model's maximum context length is {context} tokens, but the request needs "
                f"{len(prompt) + params.max_tokens} ({len(prompt)} in the prompt + {params.max_tokens} max_tokens): "
                "shorten the prompt or lower max_tokens"
            )
        if any(not s for s in params.stop):
            raise ValueError("stop strings must be non-empty")
        check(**params.sampling())

    def submit(self, prompts: Sequence[Sequence[int]], params: Sequence[GenerationParams]) -> Handle:
        """Queue completions (all or none); their outputs come through the returned Handle."""
        if len(prompts) != len(params) or not prompts:
            raise ValueError("submit needs one GenerationParams per prompt, and at least one prompt")
        if not self.running:
            raise EngineClosed("the server is shutting down" if self._closing else "the engine is not running")
        if len(prompts) > self.capacity:
            raise ValueError(
                f"{len(prompts)} completions in one request exceed the server's capacity ({self.capacity})"
            )
        for prompt, p in zip(prompts, params, strict=True):
            self.check(prompt, p)
        if self._in_flight + len(prompts) > self.capacity:
            raise QueueFull(f"the server is at capacity ({self._in_flight} of {self.capacity} requests in flight)")
        handle = Handle(self, len(prompts))
        tokenizer = self.sampler.tokenizer
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            job = _Job(handle, i, list(prompt), p, tokenizer.stream_decoder())
            handle.jobs.append(job)
            self._pending.append(job)
            self._live.add(job)
        self._in_flight += len(prompts)
        self.metrics.queue_depth.set(len(self._pending))
        self._wake.set()
        return handle

    def _cancel(self, job: _Job) -> None:
        if job.finished or job.cancelled:
            return
        job.cancelled = True
        if job.row is None and job in self._pending:
            self._pending.remove(job)
            self._finish(job, "cancelled")
        self._wake.set()  # a job in a row is released at the next decode call

    def _finish(self, job: _Job, reason: str) -> None:
        """Account for a job that will produce nothing more; its row (if any) is freed by the caller."""
        job.finished = True
        self._live.discard(job)
        self._in_flight -= 1
        self.metrics.requests.labels(reason).inc()
        self.metrics.request_latency.observe(time.perf_counter() - job.submitted)
        self.metrics.queue_depth.set(len(self._pending))

    # -- the scheduler (event loop side) -----------------------------------------------------------

    async def _schedule(self) -> None:
        while True:
            if not self._pending and not any(self._rows):
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._admit()
                if any(self._rows):
                    await self._step()
            except Exception as e:  # the batch's device state is suspect: drop it, fail its requests, go on
                logger.exception("decode batch failed; its requests fail, the engine continues")
                await self._run(self._reset)
                for row, job in enumerate(self._rows):
                    if job is not None:
                        self._fail(job, e)
                        self._rows[row] = None
            self.metrics.active_slots.set(sum(job is not None for job in self._rows))

    async def _admit(self) -> None:
        """Prefill waiting jobs into free rows, in arrival order."""
        while self._pending and None in self._rows:
            job = self._pending.popleft()
            self.metrics.queue_depth.set(len(self._pending))
            row = self._rows.index(None)
            try:
                row_cache, row_state, first, done, scores, job.prompt_logprobs = await self._run(
                    self._prefill, job.prompt, job.params, job.seed
                )
            except Exception as e:
                logger.exception("prefill failed for a %d-token prompt", len(job.prompt))
                self._fail(job, e)
                continue
            self.metrics.prompt_tokens.inc(len(job.prompt))
            self.metrics.generation_tokens.inc(len(first))
            self.metrics.time_to_first_token.observe(time.perf_counter() - job.submitted)
            output = job.feed(first, self._stop_ids, done, scores)
            if job.cancelled:
                self._finish(job, "cancelled")
                continue
            job.handle._put(job, output)
            if output.finish_reason is not None:
                self._finish(job, output.finish_reason)
                continue
            try:
                await self._run(self._insert, row_cache, row_state, row)
            except Exception as e:  # the batch may be lost too: `_schedule` resets it
                self._fail(job, e)
                raise
            job.row, self._rows[row] = row, job

    async def _step(self) -> None:
        """Release rows whose job ended on the host, decode, deliver, free finished rows."""
        release = np.array([job is not None and job.finished for job in self._rows])
        release |= np.array([job is not None and job.cancelled for job in self._rows])
        start = time.perf_counter()
        tokens, done, scores = await self._run(self._decode, release)
        new = int(np.sum(tokens != NO_TOKEN))
        self.metrics.generation_tokens.inc(new)
        self.metrics.tokens_per_second.set(new / (time.perf_counter() - start))
        for row, job in enumerate(self._rows):
            if job is None:
                continue
            if release[row]:
                if job.cancelled and not job.finished:
                    self._finish(job, "cancelled")
                self._rows[row] = None
                continue
            new = tokens[row] != NO_TOKEN
            kept = tokens[row][new].tolist()
            logprobs = () if job.params.logprobs is None else self._logprobs(kept, scores, row, new, job.params)
            output = job.feed(kept, self._stop_ids, bool(done[row]), logprobs)
            if output is not None:
                job.handle._put(job, output)
            if job.finished:
                self._finish(job, output.finish_reason)
                if done[row]:  # otherwise (a stop string) the row is released at the next call
                    self._rows[row] = None

    def _fail(self, job: _Job, error: Exception) -> None:
        if not job.finished:
            self._finish(job, "error")
            job.handle._put(job, RequestFailed(f"generation failed: {type(error).__name__}: {error}"))

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    # -- device work (worker thread; the only code that touches the batch's cache and state) ----------

    @staticmethod
    def _logprobs(tokens: list[int], scores: Scores, row: int, new: np.ndarray, params: GenerationParams):
        """The TokenLogprobs of one row's new tokens, from a decode call's Scores [B, steps]."""
        return token_logprobs(tokens, Scores(*(x[row][new] for x in dataclasses.astuple(scores))), params.logprobs)

    def _prefill(self, prompt: list[int], params: GenerationParams, seed: int):
        """(row cache, row state, first tokens, done, their logprobs, the prompt's logprobs); with max_tokens 0
        only the prompt is prefilled (and scored): no row, no token."""
        cache = self.sampler.new_cache(1)
        prompt_logprobs = None
        if params.prompt_logprobs is None:
            logits, row_cache = self.sampler.prefill(cache, [prompt])
        else:
            logits, row_cache, (scores,) = self.sampler.prefill_scored(cache, [prompt])
            rest = token_logprobs(prompt[1:], scores, params.prompt_logprobs)
            prompt_logprobs = (TokenLogprob(prompt[0], None), *rest)
        if params.max_tokens == 0:
            return None, None, [], True, [], prompt_logprobs
        sampling = SamplingParams.create(1, **params.sampling())
        reports = params.logprobs is not None
        row_state = self.sampler.start(logits, [prompt], params.max_tokens, sampling, seed, logprobs=reports)
        first = [int(row_state.tokens[0])]
        scores = self.sampler.scores(logits, row_state.tokens) if reports else None
        logprobs = token_logprobs(first, scores, params.logprobs) if reports else []
        return row_cache, row_state, first, bool(row_state.done[0]), logprobs, prompt_logprobs

    def _insert(self, row_cache: KVCache, row_state: DecodeState, row: int) -> None:
        self._cache, self._dstate = insert(self._cache, self._dstate, row_cache, row_state, row)

    def _decode(self, release: np.ndarray) -> tuple[np.ndarray, np.ndarray, Scores]:
        """Mark `release` rows done, run `decode_steps` steps: (tokens [B, steps], done [B], Scores) on the host."""
        self._dstate = self._dstate.replace(done=self._dstate.done | release)
        self._cache, self._dstate, tokens, scores = self.sampler.decode(self._cache, self._dstate, self.decode_steps)
        return tokens, np.asarray(self._dstate.done), scores

    def _reset(self) -> None:
        """A fresh, empty batch (after a failure may have consumed the donated buffers)."""
        self._cache = self.sampler.new_cache(self.slots)
        self._dstate = DecodeState.empty(self.slots, self.sampler.config.vocab_size)
