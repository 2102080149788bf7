"""uvicorn, hardened: per-request receive deadlines, a drain deadline that ends streams cleanly, exit status 0.

uvicorn alone never closes a connection that sends half a request (or nothing), and waits for such
connections on shutdown; `_H11Protocol` gives each request `Policy.request_timeout` seconds to
arrive (then 408 and close) and drops half-received requests on shutdown. `Server` stops taking
requests when shutdown begins and, after `drain_timeout` seconds, ends what is still running with
an error (streams get an error event and `[DONE]`). `run` serves until SIGTERM or Ctrl-C and
returns 0 after a clean shutdown instead of re-raising the signal.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import signal
import socket

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from gemma_jax.serve.app import ApiError
from gemma_jax.serve.engine import Engine
from gemma_jax.serve.policy import API_KEY_ENV, Policy

logger = logging.getLogger(__name__)

DRAIN_GRACE = 5.0  # seconds after the drain deadline for the ended streams to flush, then uvicorn cancels


class _Config(uvicorn.Config):
    def __init__(self, app: FastAPI, *, request_timeout: float, **kwargs):
        super().__init__(app, http=_H11Protocol, **kwargs)
        self.request_timeout = request_timeout


class _H11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for each request's headers and body to arrive."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._received = False  # bytes of the current request have arrived
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self.conn.their_state is h11.IDLE:  # a next request on a kept-alive connection
            self._arm()
        self._received = True
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):  # all of it arrived (or the connection ends)
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """On server shutdown, a request still arriving is refused (503) rather than waited for."""
        if self._deadline is not None and self._received and not self._responding():
            self._refuse(503, "the server is shutting down", "service_unavailable")
        else:
            super().shutdown()

    def _arm(self) -> None:
        self._received = False
        self._deadline = self.loop.call_later(self.config.request_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _responding(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete and self.cycle.response_started

    def _expire(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self._responding():
            return
        if not self._received:  # an idle connection: just close it
            self.transport.close()
            return
        message = f"the request did not arrive within {self.config.request_timeout:g} s (--request-timeout)"
        self._refuse(408, message, "invalid_request_error")

    def _refuse(self, status: int, message: str, kind: str) -> None:
        """Answer a request that has not fully arrived, then close the connection (the app never saw it, or
        sees a disconnect)."""
        body = json.dumps(ApiError(status, message, kind).body()).encode()
        reason = {408: b"Request Timeout", 503: b"Service Unavailable"}[status]
        head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        self.transport.write(head % (status, reason, len(body)) + body)
        self._disarm()
        self.transport.close()


class Server(uvicorn.Server):
    """A uvicorn server that drains `engine` on shutdown: no new requests, and after `drain_timeout`
    seconds (None: no deadline) the ones still running end with an error."""

    def __init__(self, config: uvicorn.Config, engine: Engine, drain_timeout: float | None):
        super().__init__(config)
        self.engine, self.drain_timeout = engine, drain_timeout

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.engine.drain()
        if self.drain_timeout is not None:
            reason = f"the server shut down before this completion finished (--drain-timeout {self.drain_timeout:g} s)"
            asyncio.get_running_loop().call_later(self.drain_timeout, self.engine.abort, reason)
        await super().shutdown(sockets)


def make_server(
    app: FastAPI,
    engine: Engine,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    drain_timeout: float | None = None,
    log_level: str = "info",
) -> Server:
    """A Server for `app` (from `create_app(engine, ...)`), under the app's Policy; warns when it is exposed."""
    policy: Policy = app.state.policy
    if policy.api_key is None and not _is_loopback(host):
        logger.warning(
            "SERVING ON %s WITHOUT AN API KEY: anyone who can reach this address can use the model. "
            "Set --api-key or $%s (see docs/security.md).",
            host,
            API_KEY_ENV,
        )
    config = _Config(
        app,
        request_timeout=policy.request_timeout,
        host=host,
        port=port,
        log_level=log_level,
        timeout_keep_alive=policy.keep_alive_timeout,
        timeout_graceful_shutdown=None if drain_timeout is None else drain_timeout + DRAIN_GRACE,
    )
    return Server(config, engine, drain_timeout)


def run(server: Server) -> int:
    """Serve until SIGTERM or Ctrl-C; 0 after a clean shutdown, 1 if a second Ctrl-C forced it.

    uvicorn re-raises the signal it caught once it has shut down (so the process would die by it);
    our handlers, in place while it runs, take that re-raised signal and let `main` return instead.
    """
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in signals}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 1 if server.force_exit else 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False
