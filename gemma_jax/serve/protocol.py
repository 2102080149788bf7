"""The OpenAI request bodies we accept, validated by pydantic; anything else is a 400.

Unknown fields are rejected (a typo such as `temprature` must not be silently ignored). OpenAI
fields we do not implement (logit_bias, tools, ...) are accepted only at their neutral
value, so a client that sends the defaults works and one that relies on them gets a clear error.
`top_k`, `min_p` and `repetition_penalty` are extensions (as in vLLM); `top_k: -1` also means "no top-k filter".
Logprobs are the raw model's log_softmax (before penalties, temperature and filters), as vLLM reports them.

Types are strict (`"10"` and `true` are no integers), numbers must fit what the device uses
(int64 seed, int32 top_k, float32 temperature), text must be encodable, and the server's `Policy`
bounds (n, stop strings, logprobs) are checked while validating: `model_validate(data, context=policy)`.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from gemma_jax.serve.engine import GenerationParams
from gemma_jax.serve.policy import Policy

INT64 = 2**63
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _unicode(s: str) -> str:
    """Refuse lone surrogates ("\\ud800" in JSON): Python parses them, but they cannot be tokenized or echoed."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"must be valid Unicode text, but holds a lone surrogate at character {e.start}") from None
    return s


def _float32(x: float) -> float:
    """Sampling runs in float32: a value that overflows it would silently become infinity."""
    if abs(x) > FLOAT32_MAX:
        raise ValueError(f"{x:g} is too large (the largest float32 is {FLOAT32_MAX:.3g})")
    return x


Text = Annotated[str, AfterValidator(_unicode)]
Stop = Annotated[str, Field(min_length=1), AfterValidator(_unicode)]
NonNegative = Annotated[float, Field(ge=0), AfterValidator(_float32)]
Penalty = Annotated[float, Field(ge=-2, le=2)]  # OpenAI's range for presence and frequency penalties


def _policy(info: ValidationInfo) -> Policy:
    """The Policy passed as validation context (`model_validate(..., context=policy)`), else the defaults."""
    return info.context if isinstance(info.context, Policy) else Policy()


def _bounded_logprobs(k: int, info: ValidationInfo) -> int:
    limit = _policy(info).max_logprobs
    if k > limit:
        raise ValueError(f"at most {limit} alternatives per token (the server's --max-logprobs), got {k}")
    return k


Logprobs = Annotated[int, Field(ge=0), AfterValidator(_bounded_logprobs)]  # alternatives per token


class _Body(BaseModel):
    # strict: "10", true and 1.0 are not integers, "yes" is no boolean; NaN and Infinity are no numbers.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingRequest(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: Text
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: NonNegative | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1, lt=2**31)] | None = None  # an int32 on the device
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1)] | None = None
    seed: Annotated[int, Field(ge=-INT64, lt=INT64)] | None = None  # an int64, as OpenAI's
    stop: Stop | list[Stop] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: Text | None = None  # accepted and ignored, as are metadata and store
    metadata: dict[Text, Text] | None = None
    store: bool | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Field(gt=0), AfterValidator(_float32)] | None = None
    # Not implemented: accepted at their neutral values only.
    logit_bias: dict[str, float] | None = None

    _NEUTRAL: ClassVar[tuple[tuple[str, tuple[Any, ...]], ...]] = (("logit_bias", (None, {})),)

    @field_validator("n")
    @classmethod
    def _bounded_n(cls, n: int | None, info: ValidationInfo) -> int | None:
        limit = _policy(info).max_n
        if n is not None and n > limit:
            raise ValueError(f"at most {limit} completions per request (the server's --max-n), got {n}")
        return n

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, stop: str | list[str] | None, info: ValidationInfo) -> str | list[str] | None:
        policy, stops = _policy(info), [stop] if isinstance(stop, str) else stop or []
        if len(stops) > policy.max_stop:
            raise ValueError(f"at most {policy.max_stop} stop strings (the server's --max-stop), got {len(stops)}")
        if any(len(s) > policy.max_stop_chars for s in stops):
            raise ValueError(f"a stop string may have at most {policy.max_stop_chars} characters (--max-stop-chars)")
        return stop

    @model_validator(mode="after")
    def _unsupported(self):
        for name, neutral in self._NEUTRAL:
            if getattr(self, name) not in neutral:
                raise ValueError(f"'{name}' is not supported by this server; omit it or use {neutral[-1]!r}")
        return self

    def logprobs_asked(self) -> tuple[int | None, int | None]:
        """(alternatives per sampled token, per prompt token); None where no logprobs are asked."""
        return None, None

    def generation_params(self, max_tokens: int) -> list[GenerationParams]:
        """One GenerationParams per choice (n of them); choice i of a seeded request uses seed + i."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        logprobs, prompt_logprobs = self.logprobs_asked()
        base = GenerationParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            min_p=self.min_p or 0.0,
            stop=stop,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
        n = self.n or 1
        # seed + i wraps around within int64, as the seed's range is all of it
        seeds = [None] * n if self.seed is None else [(self.seed + i + INT64) % (2 * INT64) - INT64 for i in range(n)]
        return [dataclasses.replace(base, seed=seed) for seed in seeds]

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    # 0 with echo: the prompt's logprobs alone (lm-eval-harness scores loglikelihoods so)
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    logprobs: Logprobs | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    _NEUTRAL = (
        *SamplingRequest._NEUTRAL,
        ("suffix", (None,)),
        ("best_of", (None, 1)),
    )

    @model_validator(mode="after")
    def _zero_tokens_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("'max_tokens' may be 0 only with 'echo': true (to score the prompt); ask for 1 or more")
        return self

    def logprobs_asked(self) -> tuple[int | None, int | None]:
        return self.logprobs, self.logprobs if self.echo else None

    @field_validator("prompt")
    @classmethod
    def _bounded_prompts(cls, prompt, info: ValidationInfo):
        """n x prompts completions at most: checked before any prompt is tokenized or any choice built."""
        limit, n = _policy(info).max_n, info.data.get("n") or 1
        count = len(_prompt_list(prompt))
        if count * n > limit:
            raise ValueError(
                f"{count} prompts x n={n} ask for {count * n} completions; this server allows at most {limit} "
                "per request (--max-n)"
            )
        return prompt

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or a list of token ids."""
        return _prompt_list(self.prompt)


def _prompt_list(p: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    return [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Logprobs | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    _NEUTRAL = (
        *SamplingRequest._NEUTRAL,
        ("tools", (None, [])),
        ("tool_choice", (None, "none")),
        ("response_format", (None, {"type": "text"})),
    )

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("'top_logprobs' needs 'logprobs': true")
        return self

    def logprobs_asked(self) -> tuple[int | None, int | None]:
        return (self.top_logprobs or 0) if self.logprobs else None, None

    @property
    def chat(self) -> list[dict[str, str]]:
        """Messages for the tokenizer's chat template ("developer" is OpenAI's newer name for "system")."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in self.messages]


class TokenizeRequest(_Body):
    """vLLM's /tokenize body: text to token ids; `add_special_tokens` puts BOS first."""

    model: Text | None = None
    prompt: Text
    add_special_tokens: bool = True


class DetokenizeRequest(_Body):
    """vLLM's /detokenize body: token ids to text."""

    model: Text | None = None
    tokens: list[Annotated[int, Field(ge=0)]]
