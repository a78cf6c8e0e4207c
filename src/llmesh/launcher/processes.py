"""What the launcher runs: one `ProcessSpec` per process, built from the config.

The list is ordered (each process starts only once the previous one is healthy) and is
plain data, so it can be written to JSON and handed to the detached supervisor: tests
and future services add entries to the list instead of editing the supervisor.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import psutil

from llmesh.config import MeshConfig

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


def build_specs(cfg: MeshConfig, config_path: Path | None) -> list[ProcessSpec]:
    """The embedded mesh in start order: redis → security → tritonserver → inference → trainer → gateway."""
    return [
        redis_spec(cfg),
        security_spec(cfg, config_path),
        triton_spec(cfg),
        inference_spec(cfg, config_path),
        trainer_spec(cfg, config_path),
        gateway_spec(cfg, config_path),
    ]


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


def security_spec(cfg: MeshConfig, config_path: Path | None) -> ProcessSpec:
    s = cfg.security.server
    return service_spec(cfg, config_path, "security", "llmesh.services.security", s.port, s.grace_seconds)


def gateway_spec(cfg: MeshConfig, config_path: Path | None) -> ProcessSpec:
    s = cfg.gateway.server
    return service_spec(cfg, config_path, "gateway", "llmesh.services.gateway", s.port, s.grace_seconds)


def trainer_spec(cfg: MeshConfig, config_path: Path | None) -> ProcessSpec:
    s = cfg.trainer.server
    return service_spec(cfg, config_path, "trainer", "llmesh.services.trainer", s.port, s.grace_seconds)


def inference_spec(cfg: MeshConfig, config_path: Path | None) -> ProcessSpec:
    s = cfg.inference.server
    return service_spec(cfg, config_path, "inference", "llmesh.services.inference", s.port, s.grace_seconds)


# --- ports ----------------------------------------------------------------------------


def port_owner(port: int) -> str:
    """Best effort 'pid N (name)' of whoever listens on `port` (needs permission)."""
    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
                return f"pid {c.pid} ({psutil.Process(c.pid).name()})"
    except (psutil.Error, OSError):
        pass
    return "another process"


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    # SO_REUSEADDR as servers use it, so TIME_WAIT leftovers do not count as taken.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def check_ports_free(specs: Sequence[ProcessSpec]) -> None:
    """Refuse to start over someone else's server: a clear error, not a crash loop."""
    for spec in specs:
        for port in spec.all_ports():
            if not port_is_free(port):
                raise LauncherError(
                    f"{spec.name}: port {LOOPBACK}:{port} is already in use by {port_owner(port)}; "
                    "stop it or choose another port in the config"
                )


# --- on-disk layout shared by the supervisor and the CLI --------------------------------


def pid_path(cfg: MeshConfig) -> Path:
    return cfg.run_dir / "supervisor.pid"


def state_path(cfg: MeshConfig) -> Path:
    return cfg.run_dir / "state.json"


def specs_path(cfg: MeshConfig) -> Path:
    return cfg.run_dir / "specs.json"


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Readers see the old file or the new one, never half of one, even after a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def read_state(cfg: MeshConfig) -> dict[str, Any] | None:
    try:
        data = json.loads(state_path(cfg).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def write_specs(path: Path, specs: Sequence[ProcessSpec]) -> None:
    # 0600: the specs carry the full environment, which may hold secrets.
    write_atomic(path, json.dumps([s.to_dict() for s in specs], indent=1), mode=0o600)


def read_specs(path: Path) -> list[ProcessSpec]:
    return [ProcessSpec.from_dict(d) for d in json.loads(path.read_text(encoding="utf-8"))]


def _reap(pid: int) -> None:
    # A daemon we spawned ourselves stays a zombie (and looks alive) until reaped.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def is_alive(pid: int, create_time: float | None = None) -> bool:
    """Alive and not a zombie; with `create_time`, also the same process (pid reuse)."""
    _reap(pid)
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(p.create_time() - create_time) < 0.5
    except psutil.Error:
        return False


def running_supervisor(cfg: MeshConfig) -> int | None:
    """The pid of this home's live supervisor, or None (stale pid files are ignored)."""
    try:
        pid = int(pid_path(cfg).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    if not is_alive(pid):
        return None
    try:
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return None
    return pid if "llmesh.launcher.supervisor" in cmdline else None
