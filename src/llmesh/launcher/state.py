"""The launcher's files in ``run_dir``, shared by the supervisor (writer) and the CLI
(reader): ``supervisor.pid``, ``state.json`` (rewritten atomically on every change) and
``specs.json`` (the process list handed to the daemon). Also what a recorded pid says
about a live process, since pids are recycled."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from llmesh.config import MeshConfig
from llmesh.launcher.processes import ProcessSpec
from llmesh.runtime.files import write_atomic

SUPERVISOR_MODULE = "llmesh.launcher.supervisor"


def pid_path(cfg: MeshConfig) -> Path:
    return cfg.run_dir / "supervisor.pid"


def state_path(cfg: MeshConfig) -> Path:
    return cfg.run_dir / "state.json"


def specs_path(cfg: MeshConfig) -> Path:
    return cfg.run_dir / "specs.json"


def read_state(cfg: MeshConfig) -> dict[str, Any] | None:
    """The supervisor's last snapshot, or None (never started, or unreadable)."""
    try:
        data = json.loads(state_path(cfg).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def write_state(cfg: MeshConfig, snapshot: dict[str, Any]) -> None:
    write_atomic(state_path(cfg), json.dumps(snapshot, indent=1))


def write_pid(cfg: MeshConfig, pid: int) -> None:
    write_atomic(pid_path(cfg), f"{pid}\n")


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
    return pid if SUPERVISOR_MODULE in cmdline else None
