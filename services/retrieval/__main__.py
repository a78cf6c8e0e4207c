"""Wiring for ``python -m llmesh.services.retrieval``."""

from __future__ import annotations

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from llmesh.config import MeshConfig, load_config
from llmesh.pb.retrieval.v1 import retrieval_pb2_grpc
from llmesh.runtime import server
from llmesh.runtime.identity import InternalIdentity, load_secret
from llmesh.services.retrieval.servicer import SERVICE, RetrievalServicer


def build(mesh: MeshConfig | None = None) -> server.Service:
    mesh = mesh or load_config()
    servicer = RetrievalServicer()

    def register(s: grpc.aio.Server) -> list[ServiceDescriptor]:
        retrieval_pb2_grpc.add_RetrievalServicer_to_server(servicer, s)
        return [SERVICE]

    identity = InternalIdentity(load_secret(mesh.home))
    return server.Service("retrieval", mesh.retrieval.server, register, identity=identity)


if __name__ == "__main__":
    server.main(build, "retrieval")
