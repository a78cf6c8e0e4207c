"""`llmesh up` on one machine: Redis, tritonserver and the services as supervised
processes on 127.0.0.1, without Docker.

- `processes`: what runs (`ProcessSpec`, built from the config by `build_specs`)
- `tritonserver`: the Triton binary, backends and command line from the pytriton wheel
- `supervisor`: the detached daemon that starts, restarts and stops them
- `state`: its files in run_dir (pid, state.json, specs.json) and pid liveness
- `ports`: the free-port check before a start
- `health`: the probes (Redis PING, Triton ready, grpc.health.v1)
- `control`: what the CLI calls (`up`, `down`, `status`, `logs`)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmesh.launcher.control import ProcessStatus, down, logs, render_status, status, up
from llmesh.launcher.processes import HealthCheck, LauncherError, ProcessSpec, RestartPolicy, build_specs

if TYPE_CHECKING:
    from llmesh.launcher.supervisor import Supervisor

__all__ = [
    "HealthCheck", "LauncherError", "ProcessSpec", "ProcessStatus", "RestartPolicy", "Supervisor",
    "build_specs", "down", "logs", "render_status", "status", "up",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    # Lazy: importing the supervisor here would load it twice under `python -m`.
    if name == "Supervisor":
        from llmesh.launcher.supervisor import Supervisor

        return Supervisor
    raise AttributeError(name)
