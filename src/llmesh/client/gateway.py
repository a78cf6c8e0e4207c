"""Channels to the gateway: a JWT on every call (refreshed before it expires) and an HMAC
signature over each request (``llmesh.auth.signature``), as interceptors, so any
generated stub uses them unchanged.

gRPC's own retries are off on these channels: a retried attempt would resend the same
nonce and be refused as a replay; retry the call (a new signature) instead."""

from __future__ import annotations

import grpc
import grpc.aio

from llmesh.auth.signature import sign
from llmesh.client.interceptors import AioMetadata, Metadata, MetadataInterceptor
from llmesh.client.keys import ApiKey
from llmesh.client.tokens import AsyncTokenSource, TokenSource, aio_issue_token_fetcher, issue_token_fetcher
from llmesh.runtime.channels import channel_options

ISSUE_TOKEN = "/llmesh.security.v1.Security/IssueToken"


class SigningInterceptor(MetadataInterceptor):
    """Adds ``authorization: Bearer <jwt>`` and the signature metadata to every call.
    Client streams sign their first message: the call starts once that message exists."""

    needs_body = True

    def __init__(self, key: ApiKey, tokens: TokenSource | None) -> None:
        self.key = key
        self.tokens = tokens

    def extra(self, method: str, body: bytes) -> Metadata:
        md = [("authorization", f"Bearer {self.tokens.token()}")] if self.tokens is not None else []
        return md + sign(self.key.secret.encode(), method, body, key_id=self.key.key_id)


class AioSigning(AioMetadata):
    """The aio twin of :class:`SigningInterceptor`. ``IssueToken`` passes through bare:
    the token source fetches on the same channel, with the key's secret in the body."""

    needs_body = True

    def __init__(self, key: ApiKey, tokens: AsyncTokenSource | None) -> None:
        self.key = key
        self.tokens = tokens

    async def extra(self, method: str, body: bytes) -> Metadata:
        if method == ISSUE_TOKEN:
            return []
        md = [("authorization", f"Bearer {await self.tokens.token()}")] if self.tokens is not None else []
        return md + sign(self.key.secret.encode(), method, body, key_id=self.key.key_id)


def gateway_channel(
    address: str, key: ApiKey, *, scopes: list[str] | None = None, ttl_s: int = 0, refresh_margin_s: float = 30.0
) -> grpc.Channel:
    """A sync channel to the gateway at ``address`` calling as ``key``. The token is
    fetched on the first call (narrowed to ``scopes``, living ``ttl_s`` or the server's
    default) and again ``refresh_margin_s`` before it expires (at most half its lifetime)."""
    channel = grpc.insecure_channel(address, options=channel_options(retries=False))
    tokens = TokenSource(issue_token_fetcher(channel, key, scopes=scopes, ttl_s=ttl_s), refresh_margin_s)
    return grpc.intercept_channel(channel, SigningInterceptor(key, tokens))


def gateway_aio_channel(
    address: str, key: ApiKey, *, scopes: list[str] | None = None, ttl_s: int = 0, refresh_margin_s: float = 30.0
) -> grpc.aio.Channel:
    """The aio twin of :func:`gateway_channel`; create it inside the running event loop."""
    signing = AioSigning(key, None)
    channel = grpc.aio.insecure_channel(
        address, options=channel_options(retries=False), interceptors=signing.interceptors()
    )
    fetch = aio_issue_token_fetcher(channel, key, scopes=scopes, ttl_s=ttl_s)
    signing.tokens = AsyncTokenSource(fetch, refresh_margin_s)
    return channel
