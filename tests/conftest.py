"""Session-wide fixtures: the real mesh (Redis, tritonserver, services) is started
once per test session by the launcher, on free loopback ports, in a temporary
LLMESH_HOME, and stopped at the end."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from llmesh.client import local_channel
from llmesh.config import MeshConfig, load_config
from tests.support.orphans import down_leaves_no_orphans
from tests.support.sandbox import free_ports, make_random_adapter, write_config

TEST_ADAPTER = "test-lora"
# Small bounds so expiry and trimming are observable within a test.
TEST_SETTINGS = {"chat_ttl_seconds": 4, "chat_max_messages": 6, "max_prompt_chars": 6000, "max_tokens_limit": 1024}
# A small upload limit and frequent checkpoints, so both are observable within a test.
TRAINER_SETTINGS = {"max_dataset_bytes": 200_000, "checkpoint_every_steps": 5}
__all__ = ["free_ports", "Mesh", "TEST_ADAPTER"]


@dataclass
class Mesh:
    cfg: MeshConfig
    config_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.cfg.inference.server.port}"

    def state(self) -> dict:
        return json.loads((self.cfg.run_dir / "state.json").read_text())

    def security(self):  # type: ignore[no-untyped-def]
        """A stub straight to the security service, as the host's operator."""
        from llmesh.pb.security.v1 import security_pb2_grpc

        return security_pb2_grpc.SecurityStub(
            local_channel(f"127.0.0.1:{self.cfg.security.server.port}", self.cfg.home)
        )

    def pid(self, name: str) -> int:
        return next(p["pid"] for p in self.state()["processes"] if p["name"] == name)


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    from llmesh.launcher import control
    from llmesh.demo.models import init_models

    for k in [k for k in os.environ if k.startswith("LLMESH")]:
        del os.environ[k]  # the test mesh is configured only by its own file
    home = tmp_path_factory.mktemp("llmesh-home")
    path = write_config(home, {"inference": TEST_SETTINGS, "trainer": TRAINER_SETTINGS})
    cfg = load_config(path)
    init_models(cfg.home)
    make_random_adapter(cfg.llm_path, cfg.adapter_dir / TEST_ADAPTER)
    try:
        control.up(cfg, config_path=path, timeout=300)
    except Exception:
        for log in sorted(cfg.log_dir.glob("*.log")):
            print(f"==== {log.name}\n" + log.read_text()[-3000:])
        control.down(cfg)
        raise
    yield Mesh(cfg, path)
    # Last thing of every session that started the mesh: no process of it survives `down`.
    down_leaves_no_orphans(cfg)


@pytest.fixture(scope="session")
def channel(mesh: Mesh) -> Iterator[grpc.Channel]:
    # Straight to the service, vouched for with the mesh's internal identity.
    ch = local_channel(mesh.address, mesh.cfg.home)
    yield ch
    ch.close()


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel):  # type: ignore[no-untyped-def]
    from llmesh.pb.inference.v1 import inference_pb2_grpc

    return inference_pb2_grpc.InferenceStub(channel)
