"""Wiring for ``python -m llmesh.services.embedding``."""

from __future__ import annotations

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from llmesh.config import MeshConfig, load_config
from llmesh.pb.embedding.v1 import embedding_pb2_grpc
from llmesh.runtime import server
from llmesh.runtime.identity import InternalIdentity, load_secret
from llmesh.services.embedding.servicer import SERVICE, EmbeddingServicer


def build(mesh: MeshConfig | None = None) -> server.Service:
    mesh = mesh or load_config()
    servicer = EmbeddingServicer()

    def register(s: grpc.aio.Server) -> list[ServiceDescriptor]:
        embedding_pb2_grpc.add_EmbeddingServicer_to_server(servicer, s)
        return [SERVICE]

    identity = InternalIdentity(load_secret(mesh.home))
    return server.Service("embedding", mesh.embedding.server, register, identity=identity)


if __name__ == "__main__":
    server.main(build, "embedding")
