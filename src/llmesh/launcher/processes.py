"""What the launcher runs: one `ProcessSpec` per process, built from the config.

The list is ordered (each process starts only once the previous one is healthy) and is
plain data, so it can be written to JSON and handed to the detached supervisor: tests
and future services add entries to the list instead of editing the supervisor.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from llmesh.config import MeshConfig
from llmesh.runtime.config import ServerSettings

HealthKind = Literal["redis", "triton", "grpc"]
LOOPBACK = "127.0.0.1"


class LauncherError(RuntimeError):
    """The mesh could not be started, stopped or inspected; the message says why."""


@dataclass(frozen=True)
class HealthCheck:
    """How to ask a process whether it is ready (see `llmesh.launcher.health`)."""

    kind: HealthKind
    port: int
    host: str = LOOPBACK
    # Triton only: models that must report ready besides the server itself.
    models: tuple[str, ...] = ()


@dataclass(frozen=True)
class RestartPolicy:
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 10.0
    # More than `max_restarts` restarts within `window_s` seconds is a crash loop.
    max_restarts: int = 5
    window_s: float = 60.0


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str]  # the full environment, not additions
    cwd: str
    port: int  # where clients connect (shown by `status`)
    health: HealthCheck
    # Every port the process binds; each must be free before the first start.
    ports: tuple[int, ...] = ()
    grace_s: float = 10.0  # SIGTERM → SIGKILL delay at stop
    # SIGTERM the whole process group at stop (False: the leader only, for a server that
    # stops its own children; the group still gets SIGKILL after the grace).
    term_group: bool = True
    start_timeout_s: float = 120.0  # first start: spawn → healthy
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    # /dev/shm files with these name prefixes that the process maps are removed once
    # it is gone: a killed tritonserver leaves its Python-backend regions behind.
    shm_prefixes: tuple[str, ...] = ()

    def all_ports(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys((self.port, *self.ports)))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["env"] = dict(self.env)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ProcessSpec:
        h = dict(d["health"])
        h["models"] = tuple(h.get("models", ()))
        return cls(
            name=d["name"],
            argv=tuple(d["argv"]),
            env=dict(d["env"]),
            cwd=d["cwd"],
            port=int(d["port"]),
            health=HealthCheck(**h),
            ports=tuple(d.get("ports", ())),
            grace_s=float(d.get("grace_s", 10.0)),
            term_group=bool(d.get("term_group", True)),
            start_timeout_s=float(d.get("start_timeout_s", 120.0)),
            restart=RestartPolicy(**d.get("restart", {})),
            shm_prefixes=tuple(d.get("shm_prefixes", ())),
        )


# --- the embedded mesh ----------------------------------------------------------------


# Start order: each starts once the previous one is healthy. Triton before inference
# (warm-up generates one token); embedding before retrieval (retrieval embeds queries);
# the gateway last, so the public port opens onto a mesh that answers.
SERVICE_ORDER = ("security", "tritonserver", "inference", "trainer", "embedding", "retrieval", "gateway")


def build_specs(cfg: MeshConfig, config_path: Path | None) -> list[ProcessSpec]:
    """The embedded mesh in start order: redis, then `SERVICE_ORDER`."""
    specs = [redis_spec(cfg)]
    for name in SERVICE_ORDER:
        specs.append(triton_spec(cfg) if name == "tritonserver" else mesh_service_spec(cfg, config_path, name))
    return specs


def redis_binary(cfg: MeshConfig) -> str:
    found = cfg.redis.binary or shutil.which("redis-server")
    if not found or not Path(found).is_file():
        raise LauncherError(
            f"redis-server not found ({cfg.redis.binary or 'not on PATH'}): install it "
            "with `apt-get install redis-server` or set redis.binary in the config"
        )
    return found


def redis_spec(cfg: MeshConfig) -> ProcessSpec:
    workdir = cfg.run_dir / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    port = cfg.redis.port
    argv = (
        redis_binary(cfg), "--port", str(port), "--bind", LOOPBACK,
        "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", str(workdir),
    )  # fmt: skip
    return ProcessSpec(
        name="redis", argv=argv, env=dict(os.environ), cwd=str(workdir), port=port,
        health=HealthCheck("redis", port), grace_s=5.0, start_timeout_s=20.0,
    )  # fmt: skip


def model_repository(cfg: MeshConfig) -> Path:
    """triton.model_repository, or the repository shipped as package data (tree or wheel)."""
    if cfg.triton.model_repository:
        return Path(cfg.triton.model_repository)
    return Path(str(resources.files("llmesh.triton_models")))


def triton_spec(cfg: MeshConfig) -> ProcessSpec:
    # Imported here: specs injected by tests must not need the Triton wheel layout.
    from llmesh.launcher.tritonserver import TritonNotInstalled, prepare_backends, server_command

    # A child named `triton` in the server's cwd shadows OpenAI Triton inside the
    # Python-backend stub and breaks `import torch`: run from a folder without one.
    workdir = cfg.run_dir / "triton"
    workdir.mkdir(parents=True, exist_ok=True)
    if (workdir / "triton").exists():
        raise LauncherError(f"{workdir / 'triton'} must not exist (it breaks import torch in Triton)")
    repo = model_repository(cfg)
    if not repo.is_dir():
        raise LauncherError(f"Triton model repository not found: {repo}")
    t = cfg.triton
    try:
        backends = prepare_backends(workdir / "backends")
        argv, env = server_command(
            repo=repo, backends=backends, grpc_port=t.grpc_port,
            http_port=t.http_port, metrics_port=t.metrics_port, models=list(t.models),
            env_extra={"LLMESH_HOME": str(cfg.home), "LLMESH_LLM_PATH": str(cfg.llm_path)},
        )  # fmt: skip
    except TritonNotInstalled as e:
        raise LauncherError(f"tritonserver: {e}") from e
    return ProcessSpec(
        name="tritonserver", argv=tuple(argv), env=env, cwd=str(workdir), port=t.grpc_port,
        health=HealthCheck("triton", t.http_port, models=tuple(t.models)),
        ports=(t.http_port, t.metrics_port), grace_s=15.0, start_timeout_s=300.0,
        # tritonserver unloads models through its stubs at SIGTERM; a stub that gets
        # the SIGTERM too can die first and leave the server waiting out its exit timeout.
        term_group=False, shm_prefixes=("triton_python_backend_shm_region_",),
    )  # fmt: skip


def service_spec(
    cfg: MeshConfig, config_path: Path | None, name: str, module: str, port: int, grace_s: float
) -> ProcessSpec:
    """A Python gRPC service of this package, run as `python -m <module>`."""
    env = dict(os.environ, LLMESH_HOME=str(cfg.home))
    if config_path is not None:
        env["LLMESH_CONFIG"] = str(Path(config_path).resolve())
    return ProcessSpec(
        name=name, argv=(sys.executable, "-m", module), env=env, cwd=str(cfg.home), port=port,
        health=HealthCheck("grpc", port), grace_s=grace_s + 5.0, start_timeout_s=180.0,
    )  # fmt: skip


def mesh_service_spec(cfg: MeshConfig, config_path: Path | None, name: str) -> ProcessSpec:
    """One of the mesh's own services (`services/<name>/`), by its config section."""
    servers: dict[str, ServerSettings] = {
        "security": cfg.security.server, "inference": cfg.inference.server, "trainer": cfg.trainer.server,
        "embedding": cfg.embedding.server, "retrieval": cfg.retrieval.server, "gateway": cfg.gateway.server,
    }  # fmt: skip
    if name not in servers:
        raise LauncherError(f"unknown service {name!r} (known: {', '.join(servers)})")
    s = servers[name]
    spec = service_spec(cfg, config_path, name, f"llmesh.services.{name}", s.port, s.grace_seconds)
    # /metrics is bound too: a taken metrics port must be refused before the start, like the gRPC one.
    return replace(spec, ports=(s.metrics_port,) if s.metrics_port else ())
