"""What `llmesh up|down|status|logs` call. The CLI process never supervises anything
itself: it starts the detached supervisor and reads the state file it keeps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

from llmesh.config import MeshConfig
from llmesh.launcher.health import DOWN, Health, probe
from llmesh.launcher.ports import check_ports_free
from llmesh.launcher.processes import LOOPBACK, HealthCheck, LauncherError, ProcessSpec, build_specs
from llmesh.launcher.state import (
    SUPERVISOR_MODULE,
    is_alive,
    pid_path,
    read_state,
    running_supervisor,
    specs_path,
    state_path,
    write_specs,
)
from llmesh.runtime.files import address

console = Console()
LOG_TAIL_LINES = 30


@dataclass(frozen=True)
class ProcessStatus:
    name: str
    state: str
    health: Health  # live probe, now
    port: int
    pid: int | None
    restarts: int


# --- up -------------------------------------------------------------------------------


def up(
    cfg: MeshConfig,
    config_path: Path | None,
    timeout: float = 300,
    specs: Sequence[ProcessSpec] | None = None,
) -> None:
    """Start the mesh under a detached supervisor and wait until all of it is healthy.

    `specs` replaces the process list built from the config (tests, extra services).
    Raises LauncherError naming the failing process, with the tail of its log.
    """
    pid = running_supervisor(cfg)
    if pid is not None:
        console.print(f"llmesh is already running for {cfg.home} (supervisor pid {pid})")
        return
    _kill_leftovers(cfg)  # a supervisor killed with SIGKILL leaves its children behind
    # Built here, not in the daemon: a missing redis-server or a taken port is
    # reported to the user at once instead of inside a log file.
    specs = list(specs) if specs is not None else build_specs(cfg, config_path)
    check_ports_free(specs)
    for d in (cfg.run_dir, cfg.log_dir):
        d.mkdir(parents=True, exist_ok=True)
    write_specs(specs_path(cfg), specs)
    state_path(cfg).unlink(missing_ok=True)  # never mistake an old run's state for this one
    proc = _spawn_supervisor(cfg, config_path)
    try:
        _wait_healthy(cfg, proc, timeout)
    except LauncherError:
        # A half-started mesh is worse than none.
        if proc.poll() is None:
            down(cfg, quiet=True)
        else:
            _kill_leftovers(cfg)
        raise
    # The caller renders the table (render_status(status(cfg))): printed once, not twice.
    console.print(f"llmesh is up (supervisor pid {proc.pid}, logs in {cfg.log_dir})")


def _spawn_supervisor(cfg: MeshConfig, config_path: Path | None) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable, "-m", SUPERVISOR_MODULE,
        "--config", str(Path(config_path).resolve()) if config_path else "none",
        "--specs", str(specs_path(cfg)),
    ]  # fmt: skip
    # LLMESH_HOME pinned: the daemon must resolve the same home as this process.
    env = dict(os.environ, LLMESH_HOME=str(cfg.home))
    with open(cfg.log_dir / "supervisor.log", "ab") as out:
        # New session: the daemon outlives the CLI and ignores the terminal's Ctrl-C.
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=env, cwd=str(cfg.home), start_new_session=True, close_fds=True,
        )  # fmt: skip


def _all_healthy(state: dict[str, Any] | None, pid: int) -> bool:
    if not state or state.get("supervisor_pid") != pid or state.get("phase") != "running":
        return False
    return all(p.get("state") == "healthy" for p in state.get("processes", []))


def _wait_healthy(cfg: MeshConfig, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LauncherError(_failure_report(cfg, f"the supervisor exited with code {proc.returncode}"))
        if _all_healthy(read_state(cfg), proc.pid):
            return
        time.sleep(0.2)
    raise LauncherError(_failure_report(cfg, f"the mesh was not healthy within {timeout:g} s"))


def _failure_report(cfg: MeshConfig, headline: str) -> str:
    """Headline, the supervisor's own error, and the failing process's log tail."""
    state = read_state(cfg) or {}
    lines = [headline]
    if state.get("error"):
        lines.append(str(state["error"]))
    failing = _failing_process(state)
    if failing is not None:
        lines.append(
            f"{failing['name']}: state {failing.get('state')}, restarts {failing.get('restarts')}, "
            f"last exit code {failing.get('last_exit_code')}; last lines of {failing['log']}:"
        )
        lines.append(tail_text(Path(failing["log"]), LOG_TAIL_LINES))
    else:
        log = cfg.log_dir / "supervisor.log"
        lines.append(f"last lines of {log}:")
        lines.append(tail_text(log, LOG_TAIL_LINES))
    return "\n".join(lines)


def _failing_process(state: dict[str, Any]) -> dict[str, Any] | None:
    # After a failed start everything is "stopped"; the error names the culprit.
    procs: list[dict[str, Any]] = state.get("processes", [])
    bad = [p for p in procs if p.get("state") not in ("healthy", "stopped")]
    named = [p for p in procs if str(state.get("error") or "").startswith(f"{p['name']}:")]
    return next(iter(bad or named), None)


# --- down -----------------------------------------------------------------------------


def down(cfg: MeshConfig, timeout: float = 90, quiet: bool = False) -> bool:
    """Stop the mesh. True when something was running (and is now stopped)."""
    pid = running_supervisor(cfg)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, timeout):
            console.print(f"[yellow]supervisor {pid} did not stop within {timeout:g} s: killing it[/]")
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 5)
    leftovers = _kill_leftovers(cfg)
    if pid is None and not leftovers:
        if not quiet:
            console.print("llmesh is not running")
        return False
    if leftovers:
        console.print(f"[yellow]killed leftover processes: {', '.join(leftovers)}[/]")
    pid_path(cfg).unlink(missing_ok=True)
    if not quiet:
        console.print("llmesh stopped")
    return True


def _wait_gone(pid: int, timeout: float, create_time: float | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while is_alive(pid, create_time):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                members.append(p)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def _kill_leftovers(cfg: MeshConfig) -> list[str]:
    """Kill the process groups recorded in the state file that still have members.

    Only groups whose leader is gone or is the very process recorded (same create
    time) are touched, so a recycled pid never gets someone else killed.
    """
    state = read_state(cfg) or {}
    killed: list[str] = []
    for rec in state.get("processes", []):
        pgid = rec.get("pid")
        if not pgid:
            continue
        leader_alive = is_alive(pgid)
        if leader_alive and not is_alive(pgid, rec.get("create_time")):
            continue  # the pid now belongs to someone else
        members = _group_members(pgid)
        if not members:
            continue
        killed.append(f"{rec['name']} (group {pgid}: {len(members)} process(es))")
        _signal_members(pgid, signal.SIGTERM)
        if not _wait_members_gone(pgid, 5):
            _signal_members(pgid, signal.SIGKILL)
            _wait_members_gone(pgid, 5)
    return killed


def _signal_members(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_members_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _group_members(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


# --- status ---------------------------------------------------------------------------


def status(cfg: MeshConfig) -> list[ProcessStatus]:
    """Recorded state plus a live health probe of each process (empty: never started)."""
    state = read_state(cfg)
    if not state:
        return []
    supervised = running_supervisor(cfg) is not None
    rows = []
    for rec in state.get("processes", []):
        recorded = str(rec.get("state", "stopped"))
        pid = rec.get("pid")
        if not supervised and recorded != "stopped":
            # Nobody updates the file any more: say what is actually true.
            recorded = "orphaned" if pid and is_alive(pid, rec.get("create_time")) else "stopped"
        row = ProcessStatus(
            name=str(rec["name"]), state=recorded, health=_live_health(rec),
            port=int(rec.get("port", 0)), pid=pid, restarts=int(rec.get("restarts", 0)),
        )  # fmt: skip
        rows.append(row)
    return rows


def _live_health(rec: dict[str, Any]) -> Health:
    p = rec.get("probe")
    if not p:
        return DOWN
    check = HealthCheck(kind=p["kind"], port=int(p["port"]), host=p.get("host", "127.0.0.1"),
                        models=tuple(p.get("models", ())))  # fmt: skip
    return probe(check)


_STATE_STYLE = {"healthy": "green", "starting": "cyan", "restarting": "yellow", "unhealthy": "yellow"}
_HEALTH_STYLE = {"SERVING": "green", "NOT_SERVING": "yellow", "DOWN": "red"}


def render_status(rows: Sequence[ProcessStatus]) -> None:
    if not rows:
        console.print("llmesh is not running")
        return
    table = Table(title="llmesh")
    for col in ("process", "state", "health", "address", "pid", "restarts"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r.name,
            f"[{_STATE_STYLE.get(r.state, 'red')}]{r.state}[/]",
            f"[{_HEALTH_STYLE.get(r.health, 'red')}]{r.health}[/]",
            address(LOOPBACK, r.port),
            str(r.pid or "-"),
            str(r.restarts),
        )
    console.print(table)


# --- logs -----------------------------------------------------------------------------


def tail_text(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            return b"".join(deque(f, maxlen=lines)).decode("utf-8", "replace").rstrip("\n")
    except FileNotFoundError:
        return f"(no log at {path})"


def _log_files(cfg: MeshConfig, name: str | None) -> dict[str, Path]:
    available = {p.stem: p for p in sorted(cfg.log_dir.glob("*.log"))}
    if name is None:
        return available
    if name not in available:
        raise LauncherError(f"no log for {name!r} in {cfg.log_dir} (have: {', '.join(available) or 'none'})")
    return {name: available[name]}


def logs(cfg: MeshConfig, name: str | None, lines: int = 50, follow: bool = False) -> None:
    """Print the last `lines` of one process's log (or of all, prefixed); `follow` like tail -f."""
    files = _log_files(cfg, name)
    prefix = name is None
    out = sys.stdout
    for proc_name, path in files.items():
        text = tail_text(path, lines)
        for line in text.splitlines():
            out.write(f"[{proc_name}] {line}\n" if prefix else f"{line}\n")
    out.flush()
    if follow:
        try:
            _follow(files, prefix)
        except KeyboardInterrupt:
            pass


def _follow(files: dict[str, Path], prefix: bool) -> None:
    offsets = {n: (p.stat().st_size if p.exists() else 0) for n, p in files.items()}
    partial = dict.fromkeys(files, b"")
    while True:
        for n, p in files.items():
            try:
                size = p.stat().st_size
            except FileNotFoundError:
                continue
            if size < offsets[n]:
                offsets[n] = 0  # truncated or replaced: start over
            if size == offsets[n]:
                continue
            with open(p, "rb") as f:
                f.seek(offsets[n])
                data = partial[n] + f.read()
                offsets[n] = f.tell()
            *complete, partial[n] = data.split(b"\n")
            for line in complete:
                text = line.decode("utf-8", "replace")
                sys.stdout.write(f"[{n}] {text}\n" if prefix else f"{text}\n")
        sys.stdout.flush()
        time.sleep(0.25)
