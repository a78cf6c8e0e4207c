"""The gateway's servicer: one generic handler for the whole public API (every RPC of
every routed service is admitted by the pipeline, then proxied to its upstream as raw
bytes), the service descriptors that health and reflection announce, and the one call
the gateway makes on its own behalf (the JWKS, from security)."""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from llmesh.pb.security.v1 import security_pb2, security_pb2_grpc
from llmesh.runtime.identity import IDENTITY_KEY, InternalIdentity
from llmesh.services.gateway.audit import GATEWAY
from llmesh.services.gateway.proxy import Admit, ProxyHandler, Upstreams
from llmesh.services.gateway.routes import Route, service_descriptor

JWKS_TIMEOUT_S = 5.0


class GatewayServicer:
    """The public port: what `register` puts on the server."""

    def __init__(self, routes: Mapping[str, Route], upstreams: Upstreams, admit: Admit, default_timeout_s: float):
        self.handler = ProxyHandler(routes, upstreams, admit, default_timeout_s)
        self.services = list(dict.fromkeys(r.service for r in routes.values()))

    def register(self, server: grpc.aio.Server) -> list[ServiceDescriptor]:
        server.add_generic_rpc_handlers([self.handler])
        return [service_descriptor(name) for name in self.services]


class SecurityJwks:
    """The security service's public signing keys (JWKS JSON), asked as the gateway itself."""

    def __init__(self, channel: grpc.aio.Channel, identity: InternalIdentity) -> None:
        self._stub = security_pb2_grpc.SecurityStub(channel)
        self._identity = identity

    async def __call__(self) -> str:
        md = ((IDENTITY_KEY, self._identity.mint(GATEWAY)),)
        reply = await self._stub.GetJwks(security_pb2.GetJwksRequest(), metadata=md, timeout=JWKS_TIMEOUT_S)
        return reply.jwks_json
