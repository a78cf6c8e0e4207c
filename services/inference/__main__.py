"""Wiring for ``python -m llmesh.services.inference``."""

from __future__ import annotations

from pathlib import Path

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from llmesh.adapter_store import Announced
from llmesh.config import MeshConfig, load_config
from llmesh.pb.inference.v1 import inference_pb2, inference_pb2_grpc
from llmesh.runtime import server
from llmesh.runtime.identity import InternalIdentity, load_secret
from llmesh.services.inference.llm_backend import GenerationInput, LlmBackend
from llmesh.services.inference.memory import ChatMemory
from llmesh.services.inference.sampling import Sampling
from llmesh.services.inference.servicer import InferenceServicer
from llmesh.services.inference.templates import TemplateLibrary


def build(mesh: MeshConfig | None = None) -> server.Service:
    mesh = mesh or load_config()
    cfg = mesh.inference
    llm = LlmBackend(cfg.peers.triton, cfg.model)
    memory = ChatMemory.from_url(cfg.peers.redis, max_messages=cfg.chat_max_messages, ttl_seconds=cfg.chat_ttl_seconds)
    templates = TemplateLibrary.load(Path(cfg.templates_path) if cfg.templates_path else None)
    identity = InternalIdentity(load_secret(mesh.home))
    servicer = InferenceServicer(cfg, llm, memory, templates, identity, Announced(mesh.adapter_dir))

    def register(s: grpc.aio.Server) -> list[ServiceDescriptor]:
        inference_pb2_grpc.add_InferenceServicer_to_server(servicer, s)
        return [inference_pb2.DESCRIPTOR.services_by_name["Inference"]]

    async def warmup() -> None:
        await memory.ping()
        await llm.ready()
        # One token through the whole path so the first real call is not the slow one.
        await llm.complete(GenerationInput(Sampling(temperature=0.0, max_tokens=1), prompt="warm-up"), timeout=60)

    async def close() -> None:
        await llm.close()
        await memory.close()

    return server.Service("inference", cfg.server, register, warmup, close, identity=identity)


if __name__ == "__main__":
    server.main(build, "inference")
