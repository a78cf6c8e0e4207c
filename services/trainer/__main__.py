"""Wiring for ``python -m llmesh.services.trainer`` (state and peers: see the package docstring)."""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from llmesh.config import MeshConfig, load_config
from llmesh.pb.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from llmesh.runtime import server
from llmesh.runtime.identity import InternalIdentity, load_secret
from llmesh.services.trainer import registry
from llmesh.services.trainer.runner import JobRunner
from llmesh.services.trainer.servicer import TrainerServicer
from llmesh.services.trainer.store import open_database


def build(mesh: MeshConfig | None = None) -> server.Service:
    mesh = mesh or load_config()
    cfg = mesh.trainer
    mesh.trainer_dir.mkdir(parents=True, exist_ok=True)
    if not mesh.trainer.dataset_root:  # the default root lives in LLMESH_HOME; a configured one must exist
        mesh.dataset_root.mkdir(parents=True, exist_ok=True)
    db = open_database(mesh.trainer_dir / "trainer.db")
    runner = JobRunner(mesh, db)
    identity = InternalIdentity(load_secret(mesh.home))
    servicer = TrainerServicer(mesh, db, identity, runner.wake)

    def register(s: grpc.aio.Server) -> list[ServiceDescriptor]:
        trainer_pb2_grpc.add_TrainerServicer_to_server(servicer, s)
        return [trainer_pb2.DESCRIPTOR.services_by_name["Trainer"]]

    async def warmup() -> None:
        if not db.is_open:
            await asyncio.to_thread(db.open_sync)
            await db.call(lambda c: registry.announce(c, mesh.adapter_dir))
            await runner.start()

    async def close() -> None:
        await runner.close(cfg.server.grace_seconds)
        await asyncio.to_thread(db.close_sync)

    return server.Service("trainer", cfg.server, register, warmup, close, identity=identity)


if __name__ == "__main__":
    server.main(build, "trainer")
