"""Client-side credentials for the gateway: a JWT on every call (refreshed before it
expires) and an HMAC signature over each request (``llmesh.auth.signature``).
Works as a sync gRPC channel interceptor, so any generated stub uses it unchanged.

The whole client in three lines::

    key = ApiKey("key_...", "secret shown once by `llmesh keys create`")
    channel = gateway_channel("127.0.0.1:50051", key)
    InferenceStub(channel).Generate(GenerateRequest(prompt="你好"), timeout=30)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from llmesh.auth.signature import sign
from llmesh.client import MetadataInterceptor
from llmesh.pb.security.v1 import security_pb2, security_pb2_grpc
from llmesh.runtime.channels import channel_options


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    secret: str  # as shown once by `llmesh keys create`


class TokenSource:
    """Fetches a JWT with ``fetch()`` (returning the token and its ``exp``) and caches it
    until ``refresh_margin_s`` before it expires — or half-way through its lifetime when
    that is sooner, so short-lived tokens are refreshed too. Thread-safe."""

    def __init__(self, fetch: Callable[[], tuple[str, float]], refresh_margin_s: float = 30.0) -> None:
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
                self._refresh_at = expires_at - min(self._margin, max(0.0, expires_at - now) / 2)
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


def issue_token_fetcher(
    channel: grpc.Channel, key: ApiKey, *, scopes: list[str] | None = None, ttl_s: int = 0, timeout_s: float = 10.0
) -> Callable[[], tuple[str, float]]:
    """A ``TokenSource`` fetch that exchanges the API key for a JWT with
    ``Security/IssueToken`` on ``channel`` (the gateway: the method is anonymous there,
    its body carries the key's secret)."""
    stub = security_pb2_grpc.SecurityStub(channel)

    def fetch() -> tuple[str, float]:
        r = stub.IssueToken(
            security_pb2.IssueTokenRequest(
                key_id=key.key_id, secret=key.secret, scopes=scopes or [], ttl_seconds=ttl_s
            ),
            timeout=timeout_s,
        )
        return r.token, float(r.expires_at.seconds)

    return fetch


def gateway_channel(
    address: str, key: ApiKey, *, scopes: list[str] | None = None, ttl_s: int = 0, refresh_margin_s: float = 30.0
) -> grpc.Channel:
    """A channel to the gateway on which every call carries a fresh JWT and an HMAC
    signature. The token is fetched on the first call and again ``refresh_margin_s``
    before it expires (at most half its lifetime), so long-running clients never
    present an expired one. gRPC's own retries are off: a retried attempt would resend
    the same nonce and be refused as a replay; retry the call (a new signature) instead."""
    channel = grpc.insecure_channel(address, options=channel_options(retries=False))
    fetch = issue_token_fetcher(channel, key, scopes=scopes, ttl_s=ttl_s)
    tokens = TokenSource(fetch, refresh_margin_s)
    return grpc.intercept_channel(channel, SigningInterceptor(key, tokens))
