"""JWTs for the gateway: fetched with ``Security/IssueToken`` (the key's secret in the
body; the method is anonymous at the gateway) and cached until shortly before they expire."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable

import grpc
import grpc.aio

from llmesh.client.keys import ApiKey
from llmesh.pb.security.v1 import security_pb2, security_pb2_grpc

Fetch = Callable[[], tuple[str, float]]  # → (token, expires_at as a Unix time)
AsyncFetch = Callable[[], Awaitable[tuple[str, float]]]


def refresh_time(now: float, expires_at: float, margin_s: float) -> float:
    """When to fetch again: ``margin_s`` before expiry, or half-way through the token's
    lifetime when that is sooner, so short-lived tokens are refreshed too."""
    return expires_at - min(margin_s, max(0.0, expires_at - now) / 2)


class TokenSource:
    """Calls ``fetch()`` for a token and caches it until :func:`refresh_time`. Thread-safe."""

    def __init__(self, fetch: Fetch, refresh_margin_s: float = 30.0) -> None:
        self._fetch = fetch
        self._margin = refresh_margin_s
        self._lock = threading.Lock()
        self._token = ""
        self._refresh_at = 0.0
        self.fetches = 0

    def token(self) -> str:
        with self._lock:
            now = time.time()
            if now >= self._refresh_at:
                self._token, expires_at = self._fetch()
                self.fetches += 1
                self._refresh_at = refresh_time(now, expires_at, self._margin)
            return self._token


class AsyncTokenSource:
    """The aio twin of :class:`TokenSource`: one fetch at a time per event loop."""

    def __init__(self, fetch: AsyncFetch, refresh_margin_s: float = 30.0) -> None:
        self._fetch = fetch
        self._margin = refresh_margin_s
        self._lock = asyncio.Lock()
        self._token = ""
        self._refresh_at = 0.0
        self.fetches = 0

    async def token(self) -> str:
        async with self._lock:
            now = time.time()
            if now >= self._refresh_at:
                self._token, expires_at = await self._fetch()
                self.fetches += 1
                self._refresh_at = refresh_time(now, expires_at, self._margin)
            return self._token


def _request(key: ApiKey, scopes: list[str] | None, ttl_s: int) -> security_pb2.IssueTokenRequest:
    return security_pb2.IssueTokenRequest(key_id=key.key_id, secret=key.secret, scopes=scopes or [], ttl_seconds=ttl_s)


def issue_token_fetcher(
    channel: grpc.Channel, key: ApiKey, *, scopes: list[str] | None = None, ttl_s: int = 0, timeout_s: float = 10.0
) -> Fetch:
    """A :class:`TokenSource` fetch exchanging ``key`` for a JWT on ``channel`` (the gateway)."""
    stub = security_pb2_grpc.SecurityStub(channel)

    def fetch() -> tuple[str, float]:
        r = stub.IssueToken(_request(key, scopes, ttl_s), timeout=timeout_s)
        return r.token, float(r.expires_at.seconds)

    return fetch


def aio_issue_token_fetcher(
    channel: grpc.aio.Channel, key: ApiKey, *, scopes: list[str] | None = None, ttl_s: int = 0, timeout_s: float = 10.0
) -> AsyncFetch:
    """The aio twin of :func:`issue_token_fetcher`."""
    stub = security_pb2_grpc.SecurityStub(channel)

    async def fetch() -> tuple[str, float]:
        r = await stub.IssueToken(_request(key, scopes, ttl_s), timeout=timeout_s)
        return r.token, float(r.expires_at.seconds)

    return fetch
