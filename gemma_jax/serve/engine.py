"""Continuous batching: a fixed batch of decode rows that requests join and leave between decode calls.

One asyncio task (the scheduler) owns the bookkeeping and runs every JAX call on a single worker
thread, so the event loop keeps serving HTTP while the device works. Each iteration it
  1. releases the rows whose request ended on the host (finished, cancelled, a stop string matched);
  2. admits waiting requests into free rows, all at once: grouped by prompt bucket, each group is
     prefilled in one call at a bucketed batch size into a prompt-sized scratch cache, its first tokens
     sampled (`Sampler.start`), and `insert`ed into the running batch in one call that writes only the
     slots it uses. A request that asks for its prompt's logprobs (echo) is prefilled alone by
     `Sampler.prefill_scored`; one with max_tokens 0 is only prefilled and scored, never started;
  3. dispatches the next `decode_steps` decode steps for all rows (`Sampler.decode`), and only then
     reads the tokens of the call before it and the new requests' first tokens, and hands them out as
     text. The device always has the next call queued while the host works (a row whose request ended
     on the host is released one call late).
Sampling settings, penalties, logprob requests, seeds and token budgets are per-row arrays of the decode
state, so requests with any settings share the compiled programs, and `warmup` compiles every (prompt
bucket, admission batch) program before the server opens: nothing compiles while serving
(`gemma_jax_compiles_total` on /metrics stays flat). Log-probabilities are the raw model's (log_softmax of
its logits, before penalties, temperature and filters), read one call late like the tokens.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import logging
import secrets
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from prometheus_client import CollectorRegistry
from tqdm.auto import tqdm

from gemma_jax import sharding
from gemma_jax.kv_cache import KVCache
from gemma_jax.sampler import NO_TOKEN, DecodeState, Sampler, Scores, bucket, insert
from gemma_jax.sampling import MAX_TOP_LOGPROBS, SamplingParams, check
from gemma_jax.serve.metrics import Metrics, compiles
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


@functools.partial(jax.jit, donate_argnums=0)
def _release(dstate: DecodeState, release: jax.Array) -> tuple[DecodeState, jax.Array]:
    """Mark `release` rows done; also return `done` as it was (the last decode call's, read later: the state
    itself is donated to the next call)."""
    return dstate.replace(done=dstate.done | release), jnp.copy(dstate.done)


def batch_buckets(slots: int) -> list[int]:
    """Admission batch sizes: powers of two below `slots`, then `slots` (a batch is padded up to one)."""
    return [1 << i for i in range((slots - 1).bit_length()) if 1 << i < slots] + [slots]


@dataclasses.dataclass
class _Admission:
    """Jobs prefilled together (one prompt bucket), their rows reserved; the worker fills in the outcome. A `scored`
    admission (one job, batch 1: a bounded set of programs) is prefilled by `prefill_scored`."""

    jobs: list[_Job]
    scored: bool = False
    first: np.ndarray | None = None  # [n] first tokens, once read; None for a job of max_tokens 0 (not started)
    done: np.ndarray | None = None  # [n] whether the row is already done
    scores: Scores | None = None  # [n] the first tokens' Scores (numpy), when a job asks for logprobs
    prompt_scores: list[Scores] | None = None  # each prompt's Scores (numpy), for a scored admission
    error: Exception | None = None


class Engine:
    """Serves completions from `slots` decode rows; `submit` from the event loop that runs `start()`.

    At most `slots + max_queue` completions are in flight; more raise `QueueFull`. `decode_steps`
    decode steps run per call: fewer make joins and streaming smoother, more cut per-call overhead.
    Prompts may have up to `max_prompt_tokens` tokens (default: the context less one); one admission call
    prefills at most `admission_tokens` padded prompt tokens (more wait for the next call), which bounds
    the scratch caches' memory and the number of programs `warmup` compiles.
    """

    def __init__(
        self,
        sampler: Sampler,
        *,
        slots: int = 16,
        decode_steps: int = 4,
        max_queue: int = 128,
        max_prompt_tokens: int | None = None,
        admission_tokens: int = 16384,
        registry: CollectorRegistry | None = None,
    ):
        max_prompt_tokens = sampler.cache_length - 1 if max_prompt_tokens is None else max_prompt_tokens
        for name, value, low in (
            ("slots", slots, 1),
            ("decode_steps", decode_steps, 1),
            ("max_queue", max_queue, 0),
            ("max_prompt_tokens", max_prompt_tokens, 1),
            ("admission_tokens", admission_tokens, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if max_prompt_tokens >= sampler.cache_length:
            raise ValueError(
                f"max_prompt_tokens ({max_prompt_tokens}) must be below the context length ({sampler.cache_length}): "
                "a completion needs at least one slot"
            )
        self.sampler = sampler
        self.slots, self.decode_steps, self.max_queue = slots, decode_steps, max_queue
        self.max_prompt_tokens, self.admission_tokens = max_prompt_tokens, admission_tokens
        self.batch_buckets = batch_buckets(slots)
        chunk = sampler.prefill_chunk
        self.prompt_buckets = sorted({bucket(n, chunk) for n in range(1, max_prompt_tokens + 1)})
        self.metrics = Metrics(slots, registry)
        self._cache, self._dstate = self._empty_batch()
        self._stop_ids = frozenset(sampler.tokenizer.stop_ids)
        self._rows: list[_Job | None] = [None] * slots
        self._pending: collections.deque[_Job] = collections.deque()
        self._in_flight = 0
        self._live: set[_Job] = set()  # submitted, not yet finished
        self._decoding: list[_Job | None] | None = None  # the rows' jobs when the unread decode call was dispatched
        self._tokens: tuple[jax.Array, Scores] | None = None  # that call's tokens and their Scores, on the device
        self._last_read = time.perf_counter()
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gemma-jax-engine")
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False

    # -- lifecycle ------------------------------------------------------------------------------

    def max_batch(self, length: int) -> int:
        """The largest admission batch for prompts padded to `length`: `admission_tokens` at most (one row at least)."""
        return max(n for n in self.batch_buckets if n == 1 or n * length <= self.admission_tokens)

    def warmup(self) -> None:
        """Compile, before the first request, every program serving runs (blocking): each (prompt bucket, admission
        batch) prefill and insert, start, release and decode, each by the code path that serves."""
        began, before = time.perf_counter(), compiles()
        shapes = [
            (length, n, False)
            for length in self.prompt_buckets
            for n in self.batch_buckets
            if n <= self.max_batch(length)
        ] + [(length, 1, True) for length in self.prompt_buckets]  # echo with logprobs: scored, alone
        prompt_id, free = self.sampler.tokenizer.bos_id, GenerationParams(max_tokens=1)
        # Twice, each as `_device_step` runs: the first pass leaves the batch's arrays placed as serving will (the
        # steps' outputs), the second compiles for those placements.
        for length, n, score in tqdm(shapes * 2, desc="compiling admission programs", unit="program"):
            done = self._release(np.zeros(self.slots, bool))
            prompts = [[prompt_id] * min(length, self.max_prompt_tokens)] * n
            # compiled, not run: as costly as a real one
            logits, cache = self.sampler.compile_prefill(n, length, score=score)
            state = self._start(logits, prompts, [free] * n, [0] * n)
            first_scores = self.sampler.scores(logits, state.tokens)
            self._insert(cache, state, [self.slots] * n)  # rows out of range: dropped
            self._dispatch_decode()
            jax.device_get((state.tokens, state.done, first_scores, self._take_tokens(), done))
        logger.info(
            "compiled %d programs (%d prompt buckets up to %d tokens x admission batches %s) in %.1f s",
            compiles() - before, len(self.prompt_buckets), self.max_prompt_tokens,
            self.batch_buckets, time.perf_counter() - began,
        )  # fmt: skip

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
        if len(prompt) > self.max_prompt_tokens:
            raise ValueError(
                f"The prompt has {len(prompt)} tokens but this server accepts at most {self.max_prompt_tokens} "
                "(--max-prompt-tokens): shorten the prompt"
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
            if not self._pending and not any(self._rows) and self._decoding is None:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._iterate()
            except Exception as e:  # the batch's device state is suspect: drop it, fail its requests, go on
                logger.exception("decode batch failed; its requests fail, the engine continues")
                await self._run(self._reset)
                self._decoding = None
                for row, job in enumerate(self._rows):
                    if job is not None:
                        self._fail(job, e)
                        self._rows[row] = None
            self.metrics.active_slots.set(sum(job is not None for job in self._rows))

    async def _iterate(self) -> None:
        """Release ended rows, admit waiting jobs, dispatch a decode call, then deliver the previous one's tokens."""
        release = np.array([job is not None and (job.finished or job.cancelled) for job in self._rows])
        for row in np.flatnonzero(release):
            job = self._rows[row]
            if job.cancelled and not job.finished:
                self._finish(job, "cancelled")
            self._rows[row] = None
        admissions = self._plan()
        decoding, self._decoding = self._decoding, (list(self._rows) if any(self._rows) else None)
        tokens, done, scores = await self._run(self._device_step, release, admissions, self._decoding is not None)
        for admission in admissions:
            self._admitted(admission)
        if decoding is not None:
            self._deliver(decoding, tokens, done, scores)

    def _plan(self) -> list[_Admission]:
        """Take waiting jobs (arrival order) for the free rows, reserve their rows, group them by prompt bucket
        into admission batches. A job that asks for its prompt's logprobs or no token (max_tokens 0) is admitted
        alone, at batch 1."""
        free = [row for row, job in enumerate(self._rows) if job is None]
        groups: dict[int, list[_Job]] = collections.defaultdict(list)
        admissions = []
        for row in free:
            if not self._pending:
                break
            job = self._pending.popleft()
            job.row, self._rows[row] = row, job
            scored = job.params.prompt_logprobs is not None
            if scored or job.params.max_tokens == 0:
                admissions.append(_Admission([job], scored=scored))
            else:
                groups[bucket(len(job.prompt), self.sampler.prefill_chunk)].append(job)
        self.metrics.queue_depth.set(len(self._pending))
        for length, jobs in sorted(groups.items()):
            size = self.max_batch(length)
            admissions += [_Admission(jobs[i : i + size]) for i in range(0, len(jobs), size)]
        return admissions

    def _admitted(self, admission: _Admission) -> None:
        """Hand each admitted job its first token (and the prompt's and its logprobs, when asked), or the error its
        prefill raised (its row is freed). A job of max_tokens 0 ends here with its prompt's logprobs: its row,
        never started, is freed at once."""
        for i, job in enumerate(admission.jobs):
            if admission.error is not None:
                self._fail(job, admission.error)
                self._rows[job.row] = None
                continue
            self.metrics.prompt_tokens.inc(len(job.prompt))
            self.metrics.time_to_first_token.observe(time.perf_counter() - job.submitted)
            if admission.prompt_scores is not None:
                rest = token_logprobs(job.prompt[1:], admission.prompt_scores[i], job.params.prompt_logprobs)
                job.prompt_logprobs = (TokenLogprob(job.prompt[0], None), *rest)
            first: list[int] = []
            if admission.first is None:  # nothing to generate
                self._rows[job.row], job.row = None, None
                if job.cancelled:
                    self._finish(job, "cancelled")
                    continue
            else:
                self.metrics.generation_tokens.inc()
                if job.cancelled:  # released with the next call
                    continue
                first = [int(admission.first[i])]
            top = job.params.logprobs
            logprobs = () if top is None or not first else self._logprobs(first, admission.scores, slice(i, i + 1), top)
            output = job.feed(first, self._stop_ids, admission.first is None or bool(admission.done[i]), logprobs)
            job.handle._put(job, output)
            if output.finish_reason is not None:
                self._finish(job, output.finish_reason)

    def _deliver(self, decoding: list[_Job | None], tokens: np.ndarray, done: np.ndarray, scores: Scores) -> None:
        """Hand out a decode call's tokens (and their logprobs, to the jobs that ask) to the jobs its rows held (a
        job that ended since gets nothing)."""
        new = int(np.sum(tokens != NO_TOKEN))
        now = time.perf_counter()
        self.metrics.generation_tokens.inc(new)
        self.metrics.tokens_per_second.set(new / max(now - self._last_read, 1e-9))
        self._last_read = now
        for row, job in enumerate(decoding):
            if job is None or job.finished or job.cancelled:
                continue
            new = tokens[row] != NO_TOKEN
            kept = tokens[row][new].tolist()
            top = job.params.logprobs
            logprobs = () if top is None else self._logprobs(kept, scores, (row, new), top)
            output = job.feed(kept, self._stop_ids, bool(done[row]), logprobs)
            if output is not None:
                job.handle._put(job, output)
            if job.finished:
                self._finish(job, output.finish_reason)

    def _fail(self, job: _Job, error: Exception) -> None:
        if not job.finished:
            self._finish(job, "error")
            job.handle._put(job, RequestFailed(f"generation failed: {type(error).__name__}: {error}"))

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    # -- device work (worker thread; the only code that touches the batch's cache and state) ----------

    @staticmethod
    def _logprobs(tokens: list[int], scores: Scores, pick: tuple | slice, top: int) -> list[TokenLogprob]:
        """The TokenLogprobs of one job's new tokens with `top` alternatives, from batched numpy Scores ([B, steps] of
        a decode call: `pick` (row, new-token mask); [n] of an admission's first tokens: `pick` slice(i, i + 1))."""
        return token_logprobs(tokens, jax.tree.map(lambda x: x[pick], scores), top)

    def _device_step(
        self, release: np.ndarray, admissions: list[_Admission], decode: bool
    ) -> tuple[np.ndarray | None, np.ndarray | None, Scores | None]:
        """Release rows, admit, dispatch a decode call (if `decode`), and only then wait for results: the admitted
        first tokens (and their Scores) and the previous decode call's (tokens, done, Scores), or Nones if there
        was none."""
        done = self._release(release)
        started = []
        for admission in admissions:
            try:
                cache, state, first_scores = self._prefill(admission)
            except Exception as e:  # this admission's requests fail; the running batch is untouched
                logger.exception("prefill failed for %d prompt(s)", len(admission.jobs))
                admission.error = e
                continue
            if state is not None:
                self._insert(cache, state, [job.row for job in admission.jobs])
                started.append((admission, state, first_scores))
        previous = self._dispatch_decode() if decode else self._take_tokens()
        for admission, state, first_scores in started:
            admission.first, admission.done, admission.scores = jax.device_get((state.tokens, state.done, first_scores))
        if previous is None:
            return None, None, None
        tokens, scores = jax.device_get(previous)
        return tokens, np.asarray(done), scores

    def _prefill(self, admission: _Admission) -> tuple[KVCache, DecodeState | None, Scores | None]:
        """Prefill an admission's prompts (of one bucket) together, padded to an admission batch size, into a
        prompt-sized scratch cache and sample their first tokens: (that cache, the started rows, padding rows last,
        the first tokens' Scores if a job asks for them). A scored admission records its prompt's Scores; one of
        max_tokens 0 is not started (no rows)."""
        jobs = admission.jobs
        n = min(size for size in self.batch_buckets if size >= len(jobs))
        pad = n - len(jobs)
        prompts = [job.prompt for job in jobs] + [[self.sampler.tokenizer.bos_id]] * pad
        params = [job.params for job in jobs] + [GenerationParams(max_tokens=1)] * pad
        cache = self.sampler.new_cache(n, bucket(max(map(len, prompts)), self.sampler.prefill_chunk))
        if admission.scored:
            logits, cache, admission.prompt_scores = self.sampler.prefill_scored(cache, prompts)
        else:
            logits, cache = self.sampler.prefill(cache, prompts)
        if any(p.max_tokens == 0 for p in params):  # such a job is admitted alone
            return cache, None, None
        state = self._start(logits, prompts, params, [job.seed for job in jobs] + [0] * pad)
        reports = any(p.logprobs is not None for p in params)
        return cache, state, self.sampler.scores(logits, state.tokens) if reports else None

    def _start(
        self, logits: jax.Array, prompts: list[list[int]], params: list[GenerationParams], seeds: list[int]
    ) -> DecodeState:
        """The prefilled rows' first tokens, each with its request's settings (penalties included), budget, seed
        and logprobs flag."""
        settings = [p.sampling() for p in params]
        sampling = SamplingParams.create(len(prompts), **{name: [s[name] for s in settings] for name in settings[0]})
        budgets, reports = [p.max_tokens for p in params], [p.logprobs is not None for p in params]
        return self.sampler.start(logits, prompts, budgets, sampling, seeds, logprobs=reports)

    def _insert(self, cache: KVCache, state: DecodeState, rows: list[int]) -> None:
        """Insert started rows into `rows` of the batch in one call; padding rows get an out-of-range row (dropped)."""
        rows_array = np.full(state.tokens.shape[0], self.slots, np.int32)
        rows_array[: len(rows)] = rows
        with sharding.on_mesh(self.sampler.mesh):
            self._cache, self._dstate = insert(self._cache, self._dstate, cache, state, rows_array)

    def _release(self, release: np.ndarray) -> jax.Array:
        """Mark `release` rows done; returns the done flags as the last decode call left them (on the device)."""
        with sharding.on_mesh(self.sampler.mesh):
            self._dstate, done = _release(self._dstate, release)
        return done

    def _take_tokens(self) -> tuple[jax.Array, Scores] | None:
        """The unread decode call's tokens and their Scores (on the device), None if there is none."""
        tokens, self._tokens = self._tokens, None
        return tokens

    def _dispatch_decode(self) -> tuple[jax.Array, Scores] | None:
        """Dispatch `decode_steps` steps for all rows without waiting; returns the previous call's tokens and
        Scores."""
        previous = self._take_tokens()
        self._cache, self._dstate, *tokens = self.sampler.decode(self._cache, self._dstate, self.decode_steps)
        self._tokens = tuple(tokens)
        return previous

    def _reset(self) -> None:
        """A fresh, empty batch (after a failure may have consumed the donated buffers)."""
        self._cache, self._dstate = self._empty_batch()
        self._tokens = None

    def _empty_batch(self) -> tuple[KVCache, DecodeState]:
        """Free rows, over the sampler's mesh if any. The state goes through `_release` once, so it is placed as
        the jitted steps leave it: a step compiled for a fresh state's placement would compile again after it."""
        with sharding.on_mesh(self.sampler.mesh):
            dstate, _ = _release(
                DecodeState.empty(self.slots, self.sampler.config.vocab_size), np.zeros(self.slots, bool)
            )
        return self.sampler.new_cache(self.slots), dstate
