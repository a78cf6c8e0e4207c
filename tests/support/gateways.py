"""Extra gateway processes beside a running mesh (same home, so the same security
service and audit spool), on a port of their own: for the replica and crash tests and
the gateway benchmark."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.sandbox import free_ports


@dataclass
class Replica:
    port: int
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60) -> None:
        """Starts the process and waits until it reports SERVING."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLMESH")}
        env["LLMESH_CONFIG"] = str(self.config)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "llmesh.services.gateway"], env=env, stdout=out, stderr=subprocess.STDOUT
            )
        with grpc.insecure_channel(self.address) as ch:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                assert self.proc.poll() is None, self.log.read_text()[-2000:]
                assert time.monotonic() < deadline, "replica not healthy"
                time.sleep(0.2)

    def stop(self) -> int:
        """SIGTERM (a clean shutdown) and wait; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)
        self.proc = None


def replica(mesh_config: Path, folder: Path, name: str, gateway: dict[str, Any] | None = None) -> Replica:
    """A gateway of the mesh configured by ``mesh_config`` on a free port (no metrics
    port); ``gateway`` replaces keys of its ``gateway:`` section. Not started."""
    doc = yaml.safe_load(mesh_config.read_text())
    gw = dict(doc["gateway"])
    (port,) = free_ports(1)
    gw["server"] = {**gw["server"], "port": port, "metrics_port": 0}
    gw.update(gateway or {})
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**doc, "gateway": gw}))
    return Replica(port, path, folder / f"{name}.log")
