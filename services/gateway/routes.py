"""The public API as the gateway sees it: every RPC of the routed services, its
shape and its policy, read from the generated descriptors (no second list)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from llmesh.pb.common.v1 import options_pb2

# service full name → module that defines it (imported so its descriptors exist)
PUBLIC_SERVICES = {
    "llmesh.inference.v1.Inference": "llmesh.pb.inference.v1.inference_pb2",
    "llmesh.embedding.v1.Embedding": "llmesh.pb.embedding.v1.embedding_pb2",
    "llmesh.retrieval.v1.Retrieval": "llmesh.pb.retrieval.v1.retrieval_pb2",
    "llmesh.trainer.v1.Trainer": "llmesh.pb.trainer.v1.trainer_pb2",
    "llmesh.security.v1.Security": "llmesh.pb.security.v1.security_pb2",
}


@dataclass(frozen=True)
class Route:
    """One public RPC: where it goes and what it requires."""

    path: str  # "/pkg.Service/Method"
    service: str
    method: MethodDescriptor
    upstream: str  # host:port
    policy: options_pb2.MethodPolicy
    request: type[Message]  # what every request message must parse as

    @property
    def client_streaming(self) -> bool:
        return self.method.client_streaming

    @property
    def server_streaming(self) -> bool:
        return self.method.server_streaming


def service_descriptor(name: str) -> ServiceDescriptor:
    module = importlib.import_module(PUBLIC_SERVICES[name])
    service: ServiceDescriptor = module.DESCRIPTOR.services_by_name[name.rsplit(".", 1)[1]]
    return service


def build_routes(upstreams: Mapping[str, str]) -> dict[str, Route]:
    """Routes for every method of every service that has an upstream address."""
    routes: dict[str, Route] = {}
    for name, address in upstreams.items():
        if name not in PUBLIC_SERVICES:
            raise ValueError(f"gateway.upstreams: unknown service '{name}' (known: {', '.join(PUBLIC_SERVICES)})")
        for m in service_descriptor(name).methods:
            path = f"/{name}/{m.name}"
            policy = m.GetOptions().Extensions[options_pb2.method_policy]
            routes[path] = Route(path, name, m, address, policy, GetMessageClass(m.input_type))
    return routes
