"""The API key: every route but /health needs `Authorization: Bearer <key>` (what OpenAI clients send)."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from .errors import APIError

OPEN_PATHS = frozenset({"/health"})  # for load balancers' probes, which carry no key
KEY_VARIABLE = "ORTSPEC_API_KEY"  # the environment variable holding the key (kept out of `ps` and shell history)


class RequireKey:
    """ASGI middleware answering 401 in OpenAI's error shape to requests without the key. Keys are compared
    as SHA-256 digests with `hmac.compare_digest`: in constant time, and without revealing the key's length."""

    def __init__(self, app: Any, key: str) -> None:
        self.app = app
        self._digest = hashlib.sha256(key.encode()).digest()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            problem = self._problem(dict(scope["headers"]).get(b"authorization"))
            if problem is not None:
                response = APIError(401, problem, code="invalid_api_key").response()
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _problem(self, header: bytes | None) -> str | None:
        """What is wrong with the Authorization header, or None if it carries the key."""
        if header is None:
            return "no API key given: send it as the header Authorization: Bearer <key>"
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return "the Authorization header must be Bearer <key>"
        if not hmac.compare_digest(hashlib.sha256(given.strip()).digest(), self._digest):
            return "incorrect API key"
        return None
