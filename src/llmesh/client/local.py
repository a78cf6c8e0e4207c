"""Channels straight to a service on this host, vouched for with the mesh's internal
secret (``LLMESH_HOME/security/internal.key``): for operators' tools on the mesh's host.
Everyone else goes through the gateway (``llmesh.client.gateway``)."""

from __future__ import annotations

from pathlib import Path

import grpc
import grpc.aio

from llmesh.client.interceptors import AioMetadata, Metadata, MetadataInterceptor
from llmesh.runtime.channels import channel_options
from llmesh.runtime.identity import IDENTITY_KEY, InternalIdentity, Principal, load_secret

# Who a local operator is when calling a service directly on this host.
OPERATOR = Principal("local-operator", "system", frozenset({"*"}), frozenset({"admin"}))


class _WithIdentity(MetadataInterceptor):
    """Attaches a fresh internal identity to every call (tokens live 60 s)."""

    def __init__(self, identity: InternalIdentity, principal: Principal) -> None:
        self.identity, self.principal = identity, principal

    def extra(self, method: str, body: bytes) -> Metadata:
        return [(IDENTITY_KEY, self.identity.mint(self.principal))]


class _AioWithIdentity(AioMetadata):
    def __init__(self, identity: InternalIdentity, principal: Principal) -> None:
        self.identity, self.principal = identity, principal

    async def extra(self, method: str, body: bytes) -> Metadata:
        return [(IDENTITY_KEY, self.identity.mint(self.principal))]


def local_channel(address: str, home: Path, principal: Principal = OPERATOR, *, retries: bool = True) -> grpc.Channel:
    """A sync channel to the service at ``address`` acting as ``principal``."""
    channel = grpc.insecure_channel(address, options=channel_options(retries=retries))
    return grpc.intercept_channel(channel, _WithIdentity(InternalIdentity(load_secret(home)), principal))


def local_aio_channel(
    address: str, home: Path, principal: Principal = OPERATOR, *, retries: bool = True
) -> grpc.aio.Channel:
    """The aio twin of :func:`local_channel`; create it inside the running event loop."""
    return grpc.aio.insecure_channel(
        address,
        options=channel_options(retries=retries),
        interceptors=_AioWithIdentity(InternalIdentity(load_secret(home)), principal).interceptors(),
    )
