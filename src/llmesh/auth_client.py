"""Client-side credentials for the gateway: a JWT on every call (refreshed before it
expires) and an HMAC signature over each request (``llmesh.auth.signature``).
Works as a sync gRPC channel interceptor, so any generated stub uses it unchanged."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import grpc

from llmesh.auth.signature import sign


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


class _Details(grpc.ClientCallDetails):
    def __init__(self, base: grpc.ClientCallDetails, metadata: list[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)
        self.metadata = metadata


class SigningInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                         grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <jwt>`` and the signature metadata to every call.
    Client streams sign their first message (see ``llmesh.auth.signature``): the call
    starts once that message exists."""

    def __init__(self, key: ApiKey, tokens: TokenSource | None) -> None:
        self.key = key
        self.tokens = tokens

    def _details(self, details: grpc.ClientCallDetails, body: bytes) -> _Details:
        md = list(details.metadata or [])
        if self.tokens is not None:
            md.append(("authorization", f"Bearer {self.tokens.token()}"))
        md += sign(self.key.secret.encode(), details.method, body, key_id=self.key.key_id)
        return _Details(details, md)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details, request.SerializeToString()), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details, request.SerializeToString()), request)

    def _first(self, details: Any, request_iterator: Any) -> tuple[_Details, Iterator[Any]]:
        it = iter(request_iterator)
        first = next(it, None)
        body = b"" if first is None else first.SerializeToString()
        rest = it if first is None else itertools.chain([first], it)
        return self._details(details, body), rest

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(*self._first(details, request_iterator))

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(*self._first(details, request_iterator))
