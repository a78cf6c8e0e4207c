"""Wiring for ``python -m llmesh.services.security`` (state and peers: see the package docstring)."""

from __future__ import annotations

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from llmesh.config import MeshConfig, load_config
from llmesh.pb.security.v1 import security_pb2, security_pb2_grpc
from llmesh.runtime import server
from llmesh.runtime.identity import InternalIdentity, load_secret
from llmesh.services.security.servicer import SecurityServicer


def build(mesh: MeshConfig | None = None) -> server.Service:
    mesh = mesh or load_config()
    cfg = mesh.security
    servicer = SecurityServicer(cfg, mesh.home / "security")

    def register(s: grpc.aio.Server) -> list[ServiceDescriptor]:
        security_pb2_grpc.add_SecurityServicer_to_server(servicer, s)
        return [security_pb2.DESCRIPTOR.services_by_name["Security"]]

    identity = InternalIdentity(load_secret(mesh.home))
    return server.Service("security", cfg.server, register, servicer.start, servicer.close, identity=identity)


if __name__ == "__main__":
    server.main(build, "security")
