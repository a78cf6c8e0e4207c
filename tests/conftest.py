"""Session-wide fixtures: the real mesh (Redis, tritonserver, services) is started
once per test session by the launcher, on free loopback ports, in a temporary
LLMESH_HOME, and stopped at the end."""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest

from llmesh.client import local_channel
from llmesh.config import load_config
from tests.support.mesh import TEST_ADAPTER, TEST_SETTINGS, TRAINER_SETTINGS, Mesh
from tests.support.orphans import down_leaves_no_orphans
from tests.support.sandbox import make_random_adapter, write_config


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    from llmesh.demo.models import init_models
    from llmesh.launcher import control

    for k in [k for k in os.environ if k.startswith("LLMESH")]:
        del os.environ[k]  # the test mesh is configured only by its own file
    home = tmp_path_factory.mktemp("llmesh-home")
    path = write_config(home, {"inference": TEST_SETTINGS, "trainer": TRAINER_SETTINGS})
    cfg = load_config(path)
    init_models(cfg.home, llm=cfg.triton.llm_model)  # the tiny test LM, set by write_config
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
def stub(channel: grpc.Channel):
    from llmesh.pb.inference.v1 import inference_pb2_grpc

    return inference_pb2_grpc.InferenceStub(channel)
