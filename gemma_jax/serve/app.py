"""The HTTP layer: OpenAI's /v1/completions and /v1/chat/completions (JSON or SSE), /v1/models,
/health and Prometheus /metrics, over one `Engine`; and vLLM's /tokenize, /detokenize and /tokenizer_info,
which evaluation clients (lm-eval-harness's `tokenizer_backend=remote`) use instead of a hub tokenizer.

Every error is an OpenAI-style body `{"error": {"message", "type", "param", "code"}}`: invalid
requests 400 (a chat request to a base model too: it was not trained on the template), a missing API
key 401, unknown model 404, a body over the limit 413, a full server 429, shutting down 503, a failed
generation 500. Bodies are parsed and prompts tokenized on worker threads, never on the event loop; the
bounds of the server's `Policy` are checked as a body is validated. A streamed request whose client goes
away is cancelled, and so is a non-streamed one: either way its slot is freed before the next decode call.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hmac
import itertools
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Annotated, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gemma_jax import __version__
from gemma_jax.serve.engine import Engine, EngineClosed, Handle, Output, QueueFull, RequestFailed, TokenLogprob
from gemma_jax.serve.policy import Policy
from gemma_jax.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingRequest,
    TokenizeRequest,
)
from gemma_jax.tokenizer import Tokenizer

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


class ApiError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, type: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        message, param = _utf8(message), None if param is None else _utf8(param)  # may quote the request's text
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param=param)


@dataclasses.dataclass(frozen=True)
class _Format:
    """How one endpoint shapes its choices, stream chunks, logprobs and ids."""

    object: str
    chunk_object: str
    id_prefix: str
    choice: Callable[[int, str, str, dict | None], dict]  # (index, finish_reason, text, logprobs) -> a choice
    # (index, text, logprobs, finish_reason, first) -> stream chunk choices
    deltas: Callable[[int, str, dict | None, str | None, bool], list[dict]]
    # (tokenizer, tokens' logprobs, offset of the first in the choice's text) -> the choice's "logprobs"
    logprobs: Callable[[Tokenizer, list[TokenLogprob], int], dict]


def _text_deltas(index: int, text: str, logprobs: dict | None, reason: str | None, first: bool) -> list[dict]:
    return [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}]


def _chat_deltas(index: int, text: str, logprobs: dict | None, reason: str | None, first: bool) -> list[dict]:
    deltas = []
    if first or text or logprobs:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        deltas.append({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None})
    if reason is not None:
        deltas.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": reason})
    return deltas


def _text_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob], offset: int) -> dict:
    """OpenAI's legacy completions shape: parallel lists of token strings, logprobs ({token: logprob} of the
    alternatives; None, as for a prompt's first token, where there is no logprob) and offsets in the text."""
    tokens = [tokenizer.decode([e.token]) for e in entries]
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [None if e.logprob is None else _by_text(tokenizer, e.top) for e in entries],
        "text_offset": list(itertools.accumulate(map(len, tokens), initial=offset))[:-1],
    }


def _by_text(tokenizer: Tokenizer, top: tuple[tuple[int, float], ...]) -> dict[str, float]:
    """{token text: logprob}, best first; of ids with the same text (byte pieces, controls) the best one."""
    out: dict[str, float] = {}
    for token, logprob in top:
        out.setdefault(tokenizer.decode([token]), logprob)
    return out


def _chat_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob], offset: int) -> dict:
    """OpenAI's chat shape: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""

    def item(token: int, logprob: float) -> dict:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(*t) for t in e.top]} for e in entries]}


COMPLETIONS = _Format(
    object="text_completion",
    chunk_object="text_completion",
    id_prefix="cmpl",
    choice=lambda i, reason, text, logprobs: {"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason},
    deltas=_text_deltas,
    logprobs=_text_logprobs,
)
CHAT = _Format(
    object="chat.completion",
    chunk_object="chat.completion.chunk",
    id_prefix="chatcmpl",
    choice=lambda i, reason, text, logprobs: {
        "index": i,
        "message": {"role": "assistant", "content": text},
        "logprobs": logprobs,
        "finish_reason": reason,
    },
    deltas=_chat_deltas,
    logprobs=_chat_logprobs,
)


class _Pieces:
    """Turns a choice's Outputs into response text and logprobs: echo's prompt text (and the prompt's logprobs)
    before the completion's first piece, token strings, offsets running on through the choice's text."""

    def __init__(self, tokenizer: Tokenizer, fmt: _Format, echoes: list[str] | None, logprobs: bool):
        self.tokenizer, self.fmt, self.echoes, self.logprobs = tokenizer, fmt, echoes, logprobs
        self.offsets: dict[int, int] = collections.defaultdict(int)

    def __call__(self, index: int, out: Output, first: bool) -> tuple[str, dict | None]:
        text = (self.echoes[index] if first and self.echoes else "") + out.text
        logprobs = None
        if self.logprobs:
            entries = [*(out.prompt_logprobs or ()), *out.logprobs] if first else list(out.logprobs)
            logprobs = self.fmt.logprobs(self.tokenizer, entries, self.offsets[index])
        self.offsets[index] += len(text)
        return text, logprobs


class _EventStream(StreamingResponse):
    """An SSE response that cancels its generation however the stream ends (done, disconnect, shutdown)."""

    def __init__(self, events: AsyncIterator[str], handle: Handle):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._handle = handle

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._handle.cancel()


def create_app(
    engine: Engine,
    *,
    model_name: str,
    aliases: Iterable[str] = (),
    chat: bool | None = None,
    policy: Policy | None = None,
) -> FastAPI:
    """The ASGI app serving `engine` as model `model_name` (requests may also name one of `aliases`) under
    `policy` (default: `Policy()`); its lifespan starts and drains the engine. /v1/chat/completions applies
    the chat template when `chat`, by default when the tokenizer's checkpoint is instruction-tuned;
    otherwise it answers 400."""
    tokenizer = engine.sampler.tokenizer
    names = {model_name, *aliases}
    chat = tokenizer.instruction_tuned if chat is None else chat
    context = engine.sampler.cache_length
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await engine.close()

    app = FastAPI(title="gemma_jax", version=__version__, lifespan=lifespan)
    app.state.policy = policy or Policy()
    app.add_middleware(_Guard, policy=app.state.policy)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        message, param = _describe(e.errors())
        return invalid(message, param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error").response()

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.running
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict:
        return {
            "id": model_name,
            "object": "model",
            "created": started,
            "owned_by": "gemma_jax",
            "max_model_len": context,
        }

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        _check_model(model_id, names, model_name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Response:
        _check_model(body.model, names, model_name)
        if not body.prompts:
            raise invalid("'prompt' is empty", "prompt")
        prompts = await run_in_threadpool(_encode_prompts, tokenizer, body.prompts)
        max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        echoes = [p if isinstance(p, str) else tokenizer.decode(p) for p in body.prompts] if body.echo else None
        return await _generate(
            engine, request, body, prompts, [max_tokens] * len(prompts), COMPLETIONS, model_name, echoes
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request) -> Response:
        _check_model(body.model, names, model_name)
        if not chat:
            raise invalid(
                f"'{model_name}' is a base (pretrained) model, not instruction-tuned: it was not trained on a chat "
                "template and would ramble. Send a plain prompt to /v1/completions, or serve an instruction-tuned "
                "checkpoint (start the server with --chat to apply the template anyway)",
                "model",
            )
        try:
            prompt = await run_in_threadpool(tokenizer.encode_chat, body.chat)
        except ValueError as e:
            raise invalid(str(e), "messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens or max(context - len(prompt), 1)
        return await _generate(engine, request, body, [prompt], [max_tokens], CHAT, model_name)

    # vLLM's tokenizer endpoints: lm-eval-harness's local-completions finds them (`tokenizer_backend=remote`,
    # its default when they answer) and needs no tokenizer from the hub to score loglikelihoods.
    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        return {
            "tokenizer_class": "gemma_jax.tokenizer.Tokenizer",
            "bos_token": tokenizer.piece(tokenizer.bos_id),
            "eos_token": tokenizer.piece(tokenizer.eos_id),
            "pad_token": tokenizer.piece(tokenizer.pad_id),
            "model_max_length": context,
        }

    @app.post("/tokenize")
    async def tokenize(body: TokenizeBody) -> dict:
        tokens = await run_in_threadpool(tokenizer.encode, body.prompt, add_bos=body.add_special_tokens)
        return {"count": len(tokens), "max_model_len": context, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeBody) -> dict:
        vocab = tokenizer.vocab_size
        if any(t >= vocab for t in body.tokens):
            raise invalid(f"token ids must be in [0, {vocab})", "tokens")
        return {"prompt": await run_in_threadpool(tokenizer.decode, body.tokens)}

    return app


async def _generate(
    engine: Engine,
    request: Request,
    body: SamplingRequest,
    prompts: list[list[int]],
    max_tokens: list[int],
    fmt: _Format,
    model_name: str,
    echoes: list[str] | None = None,
) -> Response:
    """Submit n choices per prompt (choice index = prompt * n + j); answer as JSON or as an SSE stream.
    `echoes` (completions' echo) holds each prompt's text, sent before its choices' completions."""
    limit, longest = request.app.state.policy.max_prompt_tokens, max(map(len, prompts))
    if limit is not None and longest > limit:
        message = f"a prompt has {longest} tokens; this server accepts at most {limit} (--max-prompt-tokens)"
        raise invalid(message, "messages" if fmt is CHAT else "prompt")
    choices = [(p, params) for p, m in zip(prompts, max_tokens, strict=True) for params in body.generation_params(m)]
    try:
        handle = engine.submit([p for p, _ in choices], [params for _, params in choices])
    except ValueError as e:
        raise invalid(str(e), "messages" if fmt is CHAT else "prompt") from None
    except QueueFull as e:
        return ApiError(429, str(e), "rate_limit_error", code="queue_full").response({"Retry-After": "1"})
    except EngineClosed as e:
        raise ApiError(503, str(e), "service_unavailable") from None
    head = {"id": f"{fmt.id_prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
    prompt_tokens = sum(map(len, prompts))
    n = len(choices) // len(prompts)
    asked = any(x is not None for x in body.logprobs_asked())
    pieces = _Pieces(engine.sampler.tokenizer, fmt, echoes and [e for e in echoes for _ in range(n)], asked)
    if body.stream:
        return _EventStream(_events(handle, fmt, pieces, head, prompt_tokens, body.include_usage), handle)
    try:
        results = await _until_disconnect(request, _collect(handle, len(choices)))
    except RequestFailed as e:
        raise ApiError(500, str(e), "server_error") from None
    finally:
        handle.cancel()  # no-op unless the client left or the handler was cancelled
    if results is None:  # the client is gone; nobody reads this
        return Response(status_code=499)
    completion_tokens = sum(out.completion_tokens for out in results)
    return JSONResponse(
        {
            **head,
            "object": fmt.object,
            "choices": [fmt.choice(i, out.finish_reason, *pieces(i, out, True)) for i, out in enumerate(results)],
            "usage": _usage(prompt_tokens, completion_tokens),
        }
    )


async def _collect(handle: Handle, size: int) -> list[Output]:
    """Every choice's Outputs joined into one: all its text and logprobs, the prompt's, the last count and reason."""
    outs: list[list[Output]] = [[] for _ in range(size)]
    async for index, out in handle:
        outs[index].append(out)
    return [
        Output(
            "".join(o.text for o in parts),
            parts[-1].completion_tokens,
            parts[-1].finish_reason or "",
            tuple(e for o in parts for e in o.logprobs),
            parts[0].prompt_logprobs,
        )
        for parts in outs
    ]


async def _until_disconnect(request: Request, work):
    """Await `work`, or return None as soon as the client disconnects (the caller then cancels)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    return task.result() if task.done() and not task.cancelled() else None


async def _events(handle: Handle, fmt: _Format, pieces: _Pieces, head: dict, prompt_tokens: int, include_usage: bool):
    """SSE lines: chunks as tokens arrive, an optional usage chunk, then [DONE]; an error becomes an error event."""
    opened: set[int] = set()
    completion_tokens: dict[int, int] = {}
    extra = {"usage": None} if include_usage else {}
    try:
        async for index, out in handle:
            completion_tokens[index] = out.completion_tokens
            first = index not in opened
            deltas = fmt.deltas(index, *pieces(index, out, first), out.finish_reason, first)
            opened.add(index)
            for delta in deltas:
                yield _sse({**head, "object": fmt.chunk_object, "choices": [delta], **extra})
        if include_usage:
            usage = _usage(prompt_tokens, sum(completion_tokens.values()))
            yield _sse({**head, "object": fmt.chunk_object, "choices": [], "usage": usage})
    except RequestFailed as e:
        yield _sse(ApiError(500, str(e), "server_error").body())
    yield "data: [DONE]\n\n"


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _check_model(name: str, names: set[str], served: str) -> None:
    if name not in names:
        raise ApiError(
            404,
            f"The model '{name}' does not exist; this server serves '{served}'",
            "invalid_request_error",
            param="model",
            code="model_not_found",
        )


# pydantic names a union member in the error location ("content.list[TextPart].0.type"): not a field, drop it.
# Constrained or validated members are named like "constrained-str" and "function-after[_unicode(), str]".
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|constrained-\w+|function-\w+\[.*\]|list\[.*\]|dict\[.*\]|[A-Z]\w*)$")


def _describe(errors) -> tuple[str, str | None]:
    """One readable message (and the offending field) from pydantic's errors: the most specific one."""
    if not errors:
        return "invalid request body", None
    error = max(errors, key=lambda e: len(e.get("loc", ())))
    loc = [str(p) for p in error.get("loc", ()) if p != "body" and not _UNION_MEMBER.match(str(p))]
    field = ".".join(loc) or None
    kind, msg = error.get("type"), str(error.get("msg", "")).removeprefix("Value error, ")
    if kind == "json_invalid":
        return f"the request body is not valid JSON: {error.get('ctx', {}).get('error', msg)}", None
    if kind == "extra_forbidden":
        return f"unrecognized request field '{field}'", field
    if kind == "missing":
        return f"'{field}' is required", field
    return (f"'{field}': {msg}" if field else msg), field


_RequestT = TypeVar("_RequestT", bound=BaseModel)


def _encode_prompts(tokenizer: Tokenizer, prompts: list[str | list[int]]) -> list[list[int]]:
    return [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]


async def _validated(request: Request, model: type[_RequestT]) -> _RequestT:
    """The body as `model`, parsed and validated on a worker thread: a big body never stalls the event loop."""
    return await run_in_threadpool(_parse, model, await request.body(), request.app.state.policy)


def _parse(model: type[_RequestT], raw: bytes, policy: Policy) -> _RequestT:
    if not raw.strip():
        raise invalid("the request body is empty: send a JSON object with 'model' and the request's fields")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise invalid(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise invalid(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data, context=policy)
    except ValidationError as e:
        raise invalid(*_describe(e.errors())) from None


async def _completion_body(request: Request) -> CompletionRequest:
    return await _validated(request, CompletionRequest)


async def _chat_body(request: Request) -> ChatCompletionRequest:
    return await _validated(request, ChatCompletionRequest)


async def _tokenize_body(request: Request) -> TokenizeRequest:
    return await _validated(request, TokenizeRequest)


async def _detokenize_body(request: Request) -> DetokenizeRequest:
    return await _validated(request, DetokenizeRequest)


CompletionBody = Annotated[CompletionRequest, Depends(_completion_body)]
TokenizeBody = Annotated[TokenizeRequest, Depends(_tokenize_body)]
DetokenizeBody = Annotated[DetokenizeRequest, Depends(_detokenize_body)]
ChatBody = Annotated[ChatCompletionRequest, Depends(_chat_body)]


def _utf8(text: str) -> str:
    """`text` with lone surrogates escaped, so that it can be sent as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class _Guard:
    """ASGI middleware, before routing: the Host header, the API key, then the body, read whole up to its limit.

    It answers 400 (a Host not in `allowed_hosts`), 401 (no matching `Authorization: Bearer` when
    `api_key` is set; /health stays open for load balancers) or 413 (a body over `max_body_bytes`,
    refused from its Content-Length before any of it is read, or as soon as a chunked body passes it).
    """

    OPEN_PATHS = frozenset({"/health"})

    def __init__(self, app: ASGIApp, policy: Policy):
        self.app, self.policy = app, policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        refusal = self._refusal(headers, scope["path"])
        if refusal is None and scope["method"] in ("POST", "PUT", "PATCH"):
            body = await self._read(headers, receive)
            if body is None:  # the client left
                return None
            if isinstance(body, ApiError):
                refusal = body
            else:
                receive = _replay(body, receive)
        if refusal is not None:
            extra = {"WWW-Authenticate": "Bearer"} if refusal.status == 401 else {}
            if refusal.status == 413:  # the rest of the body is never read: the connection cannot be reused
                extra["Connection"] = "close"
            return await refusal.response(extra)(scope, receive, send)
        return await self.app(scope, receive, send)

    def _refusal(self, headers: Headers, path: str) -> ApiError | None:
        host = headers.get("host", "")
        if self.policy.allowed_hosts and not _host_allowed(host, self.policy.allowed_hosts):
            message = f"the Host header {host!r} is not one this server accepts (--allowed-hosts)"
            return ApiError(400, message, "invalid_request_error", code="invalid_host")
        key = self.policy.api_key
        if key is not None and path not in self.OPEN_PATHS:
            given = headers.get("authorization", "").encode("latin-1")  # the header's bytes, as sent
            if not hmac.compare_digest(given, f"Bearer {key}".encode()):
                message = "missing or incorrect API key: send the header 'Authorization: Bearer <key>'"
                return ApiError(401, message, "invalid_request_error", code="invalid_api_key")
        return None

    async def _read(self, headers: Headers, receive: Receive) -> bytes | ApiError | None:
        """The whole body; an ApiError (413) once it is known to pass the limit; None if the client left."""
        limit = self.policy.max_body_bytes
        too_large = ApiError(
            413,
            f"the request body is over {limit} bytes, this server's limit (--max-body-bytes)",
            "invalid_request_error",
            code="request_too_large",
        )
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return too_large
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return too_large
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that delivers `body` once, then whatever the connection says (a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


def _host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """Whether `host` (a Host header: name or IP, maybe a port, IPv6 in brackets) matches an allowed pattern."""
    name = host[: host.index("]") + 1] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
    name = name.lower()
    patterns = [p.lower() for p in allowed]
    return any(p == "*" or p == name or (p.startswith("*.") and name.endswith(p[1:])) for p in patterns)
