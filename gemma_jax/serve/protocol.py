"""The OpenAI request bodies we accept, validated by pydantic; anything else is a 400.

Unknown fields are rejected (a typo such as `temprature` must not be silently ignored). OpenAI
fields we do not implement (penalties, logprobs, tools, ...) are accepted only at their neutral
value, so a client that sends the defaults works and one that relies on them gets a clear error.
`top_k` and `min_p` are extensions (as in vLLM); `top_k: -1` also means "no top-k filter".
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gemma_jax.serve.engine import GenerationParams

NonNegative = Annotated[float, Field(ge=0)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingRequest(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: NonNegative | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1)] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as are metadata and store
    metadata: dict[str, str] | None = None
    store: bool | None = None
    # Not implemented: accepted at their neutral values only.
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    _NEUTRAL: ClassVar[tuple[tuple[str, tuple[Any, ...]], ...]] = (
        ("frequency_penalty", (None, 0)),
        ("presence_penalty", (None, 0)),
        ("logit_bias", (None, {})),
    )

    @model_validator(mode="after")
    def _unsupported(self):
        for name, neutral in self._NEUTRAL:
            if getattr(self, name) not in neutral:
                raise ValueError(f"'{name}' is not supported by this server; omit it or use {neutral[-1]!r}")
        return self

    def generation_params(self, max_tokens: int) -> list[GenerationParams]:
        """One GenerationParams per choice (n of them); choice i of a seeded request uses seed + i."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        base = GenerationParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            min_p=self.min_p or 0.0,
            stop=stop,
        )
        n = self.n or 1
        seeds = [None] * n if self.seed is None else [self.seed + i for i in range(n)]
        return [dataclasses.replace(base, seed=seed) for seed in seeds]

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    _NEUTRAL = (
        *SamplingRequest._NEUTRAL,
        ("logprobs", (None,)),
        ("echo", (None, False)),
        ("suffix", (None,)),
        ("best_of", (None, 1)),
    )

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    _NEUTRAL = (
        *SamplingRequest._NEUTRAL,
        ("logprobs", (None, False)),
        ("top_logprobs", (None,)),
        ("tools", (None, [])),
        ("tool_choice", (None, "none")),
        ("response_format", (None, {"type": "text"})),
    )

    @property
    def chat(self) -> list[dict[str, str]]:
        """Messages for the tokenizer's chat template ("developer" is OpenAI's newer name for "system")."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in self.messages]
