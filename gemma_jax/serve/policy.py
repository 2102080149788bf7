"""What the server accepts: request bounds, connection timeouts and who may call (see docs/security.md).

One frozen `Policy` is shared by the request schemas (bounds checked while a body is validated,
before anything is built from it), the ASGI guard (host, API key, body size) and the HTTP
protocol (timeouts). `add_cli_args` and `from_args` map it to `python -m gemma_jax.serve` flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os

from gemma_jax.sampling import MAX_TOP_LOGPROBS

API_KEY_ENV = "GEMMA_JAX_API_KEY"


@dataclasses.dataclass(frozen=True)
class Policy:
    """Limits a request must fit and the access rules; the defaults suit a local, single-user server."""

    max_body_bytes: int = 2 * 2**20  # a 16k-token prompt as token ids is ~130 kB of JSON
    max_n: int = 16  # completions per request: n x prompts
    max_prompt_tokens: int | None = None  # None: the model's context is the only bound
    max_stop: int = 16  # stop strings per request
    max_stop_chars: int = 256  # characters per stop string (they are matched on every token)
    max_logprobs: int = MAX_TOP_LOGPROBS  # alternatives per token: completions' logprobs, chat's top_logprobs
    request_timeout: float = 30.0  # seconds for a request's headers and body to arrive
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open
    api_key: str | None = None  # None: no authentication
    allowed_hosts: tuple[str, ...] = ()  # Host header values accepted ("*.example.com" matches subdomains); (): any

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_n", "max_stop", "max_stop_chars", "max_logprobs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_logprobs > MAX_TOP_LOGPROBS:
            raise ValueError(f"max_logprobs must be at most {MAX_TOP_LOGPROBS} (the decode step's top-k width)")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.request_timeout <= 0 or self.keep_alive_timeout <= 0:
            raise ValueError("request_timeout and keep_alive_timeout must be > 0 seconds")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (use None for no authentication)")


# (Policy field, type, metavar, help) of the positive-number flags, --max-body-bytes etc.
_BOUNDS = (
    ("max_body_bytes", int, "BYTES", "largest request body, else 413"),
    ("max_n", int, "N", "most completions per request, n x prompts"),
    ("max_stop", int, "N", "most stop strings per request"),
    ("max_stop_chars", int, "CHARS", "longest stop string"),
    ("max_logprobs", int, "N", f"most alternatives per token for logprobs / top_logprobs, at most {MAX_TOP_LOGPROBS}"),
    ("request_timeout", float, "SECONDS", "time for a request's headers and body to arrive, else 408 and close"),
    ("keep_alive_timeout", float, "SECONDS", "time an idle keep-alive connection stays open"),
)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """The Policy flags: bounds, timeouts, --api-key and --allowed-hosts."""
    g = parser.add_argument_group("limits and access (see docs/security.md)")
    for name, kind, metavar, text in _BOUNDS:
        default = getattr(Policy, name)
        help = f"{text} (default: {default})"
        kind = _positive(kind, MAX_TOP_LOGPROBS if name == "max_logprobs" else math.inf)
        g.add_argument("--" + name.replace("_", "-"), type=kind, default=default, metavar=metavar, help=help)
    g.add_argument(
        "--max-prompt-tokens",
        type=_positive(int),
        default=None,
        metavar="TOKENS",
        help="longest prompt; start-up compiles the prefill of every prompt bucket up to it, so nothing compiles "
        "while serving, and a lower bound starts faster (default: the model's context less one)",
    )
    g.add_argument(
        "--api-key",
        type=_key,
        metavar="KEY",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"require 'Authorization: Bearer KEY' on every path but /health (default: ${API_KEY_ENV}, else none)",
    )
    g.add_argument(
        "--allowed-hosts",
        type=lambda s: tuple(h.strip().lower() for h in s.split(",") if h.strip()),
        metavar="HOSTS",
        default=(),
        help="comma-separated Host header values to accept, e.g. 'localhost,127.0.0.1,*.example.com' (default: any)",
    )


def from_args(args: argparse.Namespace) -> Policy:
    """The Policy that `add_cli_args`'s flags describe."""
    return Policy(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Policy)})


def _key(s: str) -> str:
    if not s.strip():
        raise argparse.ArgumentTypeError("the API key is empty: give a key, or omit --api-key for none")
    return s


def _positive(kind: type, most: float = math.inf):
    def parse(s: str):
        try:
            value = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {s!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a positive finite {kind.__name__}, got {s}")
        if value > most:
            raise argparse.ArgumentTypeError(f"must be at most {most:g}, got {s}")
        return value

    return parse
