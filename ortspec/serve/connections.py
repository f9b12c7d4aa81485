"""Connection guards below the app: a deadline for receiving each request, and a cap on open connections.

uvicorn has no timeout for receiving a request: its keep-alive timer only covers idle time between
requests and is reset by every byte, and the app (middleware included) only runs once the headers are
parsed. So a client sending headers or a body a byte at a time would hold its connection, and a few
hundred such clients every file descriptor. The guard is a subclass of uvicorn's own HTTP protocol (h11
or httptools, whichever uvicorn picks), so that parsing, keep-alive and shutdown stay uvicorn's.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from .errors import APIError

log = logging.getLogger("ortspec.serve")


def _refusal() -> bytes:
    """The whole HTTP response sent to a connection beyond the cap (before it said anything)."""
    body = json.dumps(
        APIError(503, "too many open connections: retry later", code="too_many_connections").body()
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


REFUSAL = _refusal()


class GuardedProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
    """uvicorn's HTTP protocol, closing a connection that has not sent its whole request (headers and body)
    within `read_timeout` seconds of the server waiting for it, and refusing connections beyond
    `max_connections` with a 503. Set both on a subclass (see `guarded_protocol`)."""

    read_timeout: float = 15.0
    max_connections: int = 128
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning("refused a connection: %d open, at most %d", len(self.connections) - 1, self.max_connections)
            transport.write(REFUSAL)
            transport.close()
            return
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request on this connection has read_timeout seconds, from now

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(self.read_timeout, self._expired)

    def _expired(self) -> None:
        """Close the connection unless its request has arrived whole and is being answered (a long
        generation is not the client's delay; the next request's deadline starts when it ends)."""
        self._deadline = None
        cycle = self.cycle
        answering = cycle is not None and not cycle.more_body and not cycle.response_complete
        if not answering and not self.transport.is_closing():
            log.warning("closed a connection that sent no whole request within %gs", self.read_timeout)
            self.transport.close()


def guarded_protocol(read_timeout: float, max_connections: int) -> type[GuardedProtocol]:
    """The protocol class for uvicorn's `http` setting, with these bounds."""
    attrs = {"read_timeout": read_timeout, "max_connections": max_connections}
    return type("GuardedProtocol", (GuardedProtocol,), attrs)


def server_config(app: Any, host: str, port: int, read_timeout: float, max_connections: int, **options: Any) -> Any:
    """uvicorn's Config for `app` with the connection guards (`options`: uvicorn's own, e.g. log_level)."""
    http = guarded_protocol(read_timeout, max_connections)
    return uvicorn.Config(app, host=host, port=port, http=http, ws="none", **options)  # no WebSocket routes
