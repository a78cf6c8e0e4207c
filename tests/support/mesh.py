"""The real mesh the e2e tests share (started once per session by the ``mesh`` fixture
in tests/conftest.py) and the settings it is started with. Tests import ``Mesh`` from
here for type annotations, never from conftest (pytest imports conftest itself)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmesh.client import local_channel
from llmesh.config import MeshConfig
from llmesh.pb.security.v1 import security_pb2_grpc
from llmesh.runtime.files import address

TEST_ADAPTER = "test-lora"
# Small bounds so expiry and trimming are observable within a test.
TEST_SETTINGS = {"chat_ttl_seconds": 4, "chat_max_messages": 6, "max_prompt_chars": 6000, "max_tokens_limit": 1024}
# A small upload limit and frequent checkpoints, so both are observable within a test.
TRAINER_SETTINGS = {"max_dataset_bytes": 200_000, "checkpoint_every_steps": 5}


@dataclass
class Mesh:
    cfg: MeshConfig
    config_path: Path

    @property
    def address(self) -> str:
        """The inference service's internal port."""
        return address(self.cfg.inference.server.host, self.cfg.inference.server.port)

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.cfg.run_dir / "state.json").read_text())
        return data

    def security(self) -> security_pb2_grpc.SecurityStub:
        """A stub straight to the security service, as the host's operator."""
        s = self.cfg.security.server
        return security_pb2_grpc.SecurityStub(local_channel(address(s.host, s.port), self.cfg.home))

    def pid(self, name: str) -> int:
        return int(next(p["pid"] for p in self.state()["processes"] if p["name"] == name))
