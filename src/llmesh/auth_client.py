"""Client-side credentials for the gateway: a JWT on every call (refreshed before it
expires) and an HMAC signature over each request (``llmesh.auth.signature``).
Works as a sync gRPC channel interceptor, so any generated stub uses it unchanged."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from llmesh.auth.signature import sign
from llmesh.client import MetadataInterceptor


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    secret: str  # as shown once by `llmesh keys create`


class TokenSource:
    """Fetches a JWT with ``fetch()`` and caches it until shortly before ``exp``."""

    def __init__(self, fetch: Callable[[], tuple[str, float]], refresh_margin_s: float = 30.0) -> None:
        self._fetch = fetch
        self._margin = refresh_margin_s
        self._lock = threading.Lock()
        self._token = ""
        self._expires_at = 0.0

    def token(self) -> str:
        with self._lock:
            if time.time() >= self._expires_at - self._margin:
                self._token, self._expires_at = self._fetch()
            return self._token


class SigningInterceptor(MetadataInterceptor):
    """Adds ``authorization: Bearer <jwt>`` and the signature metadata to every call.
    Client streams sign their first message (see ``llmesh.auth.signature``): the call
    starts once that message exists."""

    needs_body = True

    def __init__(self, key: ApiKey, tokens: TokenSource | None) -> None:
        self.key = key
        self.tokens = tokens

    def extra(self, method: str, body: bytes) -> list[tuple[str, str]]:
        md = [("authorization", f"Bearer {self.tokens.token()}")] if self.tokens is not None else []
        return md + sign(self.key.secret.encode(), method, body, key_id=self.key.key_id)
