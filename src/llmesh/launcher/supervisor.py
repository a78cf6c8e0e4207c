"""The supervisor daemon: starts the mesh in order, keeps it running, stops it cleanly.

Run as ``python -m llmesh.launcher.supervisor --config PATH|none [--specs FILE]``
(`llmesh.launcher.control.up` does this, detached). Everything it knows is written to
``run_dir/state.json`` on every change, so the CLI never has to talk to it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import psutil

from llmesh.config import ConfigError, MeshConfig, load_config
from llmesh.launcher.health import DOWN, SERVING, Health, probe
from llmesh.launcher.ports import check_ports_free
from llmesh.launcher.processes import LauncherError, ProcessSpec, build_specs
from llmesh.launcher.state import pid_path, read_specs, running_supervisor, write_pid, write_state

State = Literal["starting", "healthy", "unhealthy", "restarting", "crash-loop", "stopped"]
Phase = Literal["starting", "running", "stopping", "stopped", "failed"]
log = logging.getLogger("llmesh.supervisor")


@dataclass
class Child:
    """Runtime record of one supervised process (one per spec, across restarts)."""

    spec: ProcessSpec
    log_path: Path
    state: State = "stopped"
    health: Health = DOWN
    process: asyncio.subprocess.Process | None = None
    create_time: float | None = None
    restarts: int = 0
    last_exit_code: int | None = None
    spawned_at: float = 0.0  # monotonic
    healthy_since_spawn: bool = False
    backoff_s: float = 0.0
    restart_times: collections.deque[float] = field(default_factory=collections.deque)
    shm_files: set[str] = field(default_factory=set)  # see ProcessSpec.shm_prefixes
    became_healthy: asyncio.Event = field(default_factory=asyncio.Event)
    gave_up: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def to_json(self) -> dict[str, Any]:
        h = self.spec.health
        return {
            "name": self.spec.name,
            "pid": self.pid,
            "port": self.spec.port,
            "state": self.state,
            "restarts": self.restarts,
            "last_exit_code": self.last_exit_code,
            "log": str(self.log_path),
            "health": self.health,
            "create_time": self.create_time,
            "probe": {"kind": h.kind, "host": h.host, "port": h.port, "models": list(h.models)},
        }


def _mapped_shm(pid: int, prefixes: tuple[str, ...]) -> set[str]:
    """/dev/shm files with one of `prefixes` mapped by `pid` or its descendants."""
    found: set[str] = set()
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return found
    for p in procs:
        try:
            with open(f"/proc/{p.pid}/maps", encoding="utf-8", errors="replace") as f:
                for line in f:
                    path = line.rstrip("\n").partition("/dev/shm/")[2]
                    if path and path.startswith(prefixes):
                        found.add(f"/dev/shm/{path.removesuffix(' (deleted)')}")
        except OSError:
            continue
    return found


def _open_log(path: Path, name: str) -> IO[bytes]:
    """The process's log, appended to, with a marker line where each run starts."""
    out = open(path, "ab")
    out.write(f"\n--- llmesh: starting {name} at {time.strftime('%Y-%m-%dT%H:%M:%S%z')} ---\n".encode())
    out.flush()
    return out


def _signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Signal a whole process group (tritonserver's stub children included)."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class Supervisor:
    """Starts `specs` in order, restarts what exits, stops everything on SIGTERM/SIGINT."""

    def __init__(
        self,
        cfg: MeshConfig,
        specs: Sequence[ProcessSpec],
        *,
        probe_interval_s: float = 2.0,
        start_probe_interval_s: float = 0.2,
    ) -> None:
        self.cfg = cfg
        self.probe_interval_s = probe_interval_s
        self.start_probe_interval_s = start_probe_interval_s
        self.children = [Child(s, cfg.log_dir / f"{s.name}.log") for s in specs]
        self.phase: Phase = "starting"
        self.error: str | None = None
        self.started_at = time.time()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # --- lifecycle ------------------------------------------------------------------

    async def run(self, *, handle_signals: bool = True) -> int:
        """Until stopped (SIGTERM/SIGINT or `request_stop`); 0 after a clean stop,
        1 when the mesh failed to start. `handle_signals=False` to embed it in a
        program that owns its signals (tests)."""
        self.cfg.log_dir.mkdir(parents=True, exist_ok=True)
        self._write_pid()
        signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
        loop = asyncio.get_running_loop()
        for sig in signals:
            loop.add_signal_handler(sig, self.request_stop)
        try:
            self._write_state()
            if await self._start_all():
                self.phase = "running"
                self._write_state()
                log.info("all %d processes healthy", len(self.children))
                await self._stop.wait()
        finally:
            await self._stop_all()
            self.phase = "failed" if self.error else "stopped"
            self._write_state()
            self._remove_pid()
            for sig in signals:
                loop.remove_signal_handler(sig)
        return 1 if self.error else 0

    def request_stop(self) -> None:
        log.info("stop requested")
        self._stop.set()

    async def _start_all(self) -> bool:
        try:
            check_ports_free([c.spec for c in self.children])
        except LauncherError as e:
            return self._fail(str(e))
        for child in self.children:
            runner = asyncio.create_task(self._supervise(child), name=child.spec.name)
            self._tasks.append(runner)
            if not await self._await_first_health(child, runner):
                return False
        return True

    async def _await_first_health(self, child: Child, runner: asyncio.Task[None]) -> bool:
        waits = [asyncio.create_task(e.wait()) for e in (child.became_healthy, child.gave_up, self._stop)]
        try:
            await asyncio.wait(
                [*waits, runner], timeout=child.spec.start_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for w in waits:
                w.cancel()
        if child.became_healthy.is_set():
            return True
        if self._stop.is_set():
            return False  # asked to stop while starting: not an error
        if runner.done() and not child.gave_up.is_set():
            return self._fail(f"{child.spec.name}: supervision failed: {runner.exception()!r}")
        if child.gave_up.is_set():
            return self._fail(f"{child.spec.name}: crash-loop while starting (last exit code {child.last_exit_code})")
        return self._fail(
            f"{child.spec.name}: not healthy within {child.spec.start_timeout_s:g} s (health {child.health})"
        )

    def _fail(self, message: str) -> bool:
        log.error("%s", message)
        self.error = message
        return False

    async def _stop_all(self) -> None:
        self.phase = "stopping"
        self._stop.set()
        # Runners see the stop event and return without restarting anything.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._write_state()
        for child in reversed(self.children):
            await self._terminate(child)

    async def _terminate(self, child: Child) -> None:
        """SIGTERM the group, wait the grace, then SIGKILL the group (leftovers too)."""
        proc = child.process
        if proc is not None and proc.returncode is None:
            log.info("stopping %s (pid %d, grace %.0f s)", child.spec.name, proc.pid, child.spec.grace_s)
            if child.spec.term_group:
                _signal_group(proc.pid, signal.SIGTERM)
            else:
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), child.spec.grace_s)
            except TimeoutError:
                log.warning("%s did not stop within %.0f s: SIGKILL", child.spec.name, child.spec.grace_s)
                _signal_group(proc.pid, signal.SIGKILL)
                await proc.wait()
            child.last_exit_code = proc.returncode
        if proc is not None:
            _signal_group(proc.pid, signal.SIGKILL)  # children that outlived their leader
        self._remove_shm(child)
        if child.state != "crash-loop":  # keep why it was down for whoever reads the state
            child.state = "stopped"
        child.health = DOWN
        self._write_state()

    # --- one process ---------------------------------------------------------------

    async def _supervise(self, child: Child) -> None:
        """Spawn, watch, restart with backoff, until stopped or crash-looping."""
        while not self._stop.is_set():
            await self._spawn(child)
            code = await self._watch(child)
            if code is None:
                return
            self._record_exit(child, code)
            if self._crash_looping(child):
                child.state = "crash-loop"
                child.gave_up.set()
                log.error(
                    "%s: crash-loop (more than %d restarts in %.0f s); not restarting it",
                    child.spec.name, child.spec.restart.max_restarts, child.spec.restart.window_s,
                )  # fmt: skip
                self._write_state()
                return
            delay = self._next_backoff(child)
            child.state = "restarting"
            child.restarts += 1
            child.restart_times.append(time.monotonic())
            log.warning("%s exited with %s; restart %d in %.1f s", child.spec.name, code, child.restarts, delay)
            self._write_state()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    async def _spawn(self, child: Child) -> None:
        spec = child.spec
        child.healthy_since_spawn = False
        child.health = DOWN
        child.state = "starting"
        child.spawned_at = time.monotonic()
        with _open_log(child.log_path, spec.name) as out:
            try:
                # Own session and process group: stop signals the whole group, and a
                # Ctrl-C in the terminal that ran `llmesh up` never reaches the mesh.
                child.process = await asyncio.create_subprocess_exec(
                    *spec.argv, cwd=spec.cwd, env=dict(spec.env), stdin=asyncio.subprocess.DEVNULL,
                    stdout=out, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
            except OSError as e:
                out.write(f"llmesh: cannot start {spec.argv[0]}: {e}\n".encode())
                child.process = None
        if child.process is not None:
            with contextlib.suppress(psutil.Error):
                child.create_time = psutil.Process(child.process.pid).create_time()
            log.info("started %s (pid %d)", spec.name, child.process.pid)
        self._write_state()

    async def _watch(self, child: Child) -> int | None:
        """Probe until the process exits (its exit code) or a stop is requested (None)."""
        if child.process is None:
            return 127  # could not even be spawned: counts as a crash
        exited = asyncio.create_task(child.process.wait())
        stopping = asyncio.create_task(self._stop.wait())
        try:
            while True:
                interval = self.probe_interval_s if child.healthy_since_spawn else self.start_probe_interval_s
                await asyncio.wait({exited, stopping}, timeout=interval, return_when=asyncio.FIRST_COMPLETED)
                if stopping.done():
                    return None
                if exited.done():
                    return exited.result()
                await self._probe(child)
        finally:
            exited.cancel()
            stopping.cancel()

    async def _probe(self, child: Child) -> None:
        health = await asyncio.to_thread(probe, child.spec.health)
        if child.spec.shm_prefixes and child.pid is not None:
            # At every probe, starting included: regions appear while models load.
            child.shm_files |= await asyncio.to_thread(_mapped_shm, child.pid, child.spec.shm_prefixes)
        if self._stop.is_set() or not child.running:
            return
        if health == SERVING:
            state: State = "healthy"
            child.healthy_since_spawn = True
            child.became_healthy.set()
        else:
            # Recorded, not acted on: a live process that stops answering may be busy.
            state = "unhealthy" if child.healthy_since_spawn else "starting"
        if (state, health) != (child.state, child.health):
            if state == "unhealthy":
                log.warning("%s is unhealthy (%s)", child.spec.name, health)
            child.state, child.health = state, health
            self._write_state()

    def _record_exit(self, child: Child, code: int) -> None:
        child.last_exit_code = code
        child.health = DOWN
        if child.process is not None:
            _signal_group(child.process.pid, signal.SIGKILL)  # orphans of the dead leader
        self._remove_shm(child)

    def _remove_shm(self, child: Child) -> None:
        # Safe even if a dying stub still maps one: the mapping outlives the name.
        for path in child.shm_files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                log.info("%s: removed leftover %s", child.spec.name, path)
        child.shm_files.clear()

    def _crash_looping(self, child: Child) -> bool:
        policy = child.spec.restart
        now = time.monotonic()
        while child.restart_times and now - child.restart_times[0] > policy.window_s:
            child.restart_times.popleft()
        return len(child.restart_times) >= policy.max_restarts

    def _next_backoff(self, child: Child) -> float:
        policy = child.spec.restart
        # A run longer than the crash window was a real run: start the backoff over.
        if time.monotonic() - child.spawned_at > policy.window_s or child.backoff_s == 0:
            child.backoff_s = policy.backoff_initial_s
        else:
            child.backoff_s = min(child.backoff_s * 2, policy.backoff_max_s)
        return child.backoff_s

    # --- files ---------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "supervisor_pid": os.getpid(),
            "started_at": self.started_at,
            "updated_at": time.time(),
            "phase": self.phase,
            "error": self.error,
            "processes": [c.to_json() for c in self.children],
        }

    def _write_state(self) -> None:
        write_state(self.cfg, self.snapshot())

    def _write_pid(self) -> None:
        other = running_supervisor(self.cfg)
        if other is not None and other != os.getpid():
            raise LauncherError(f"a supervisor is already running for {self.cfg.home} (pid {other})")
        write_pid(self.cfg, os.getpid())

    def _remove_pid(self) -> None:
        path = pid_path(self.cfg)
        with contextlib.suppress(FileNotFoundError, ValueError):
            if int(path.read_text().strip()) == os.getpid():
                path.unlink()


def _write_failed_state(cfg: MeshConfig, message: str) -> None:
    """Tell `up` why the supervisor could not even build its process list."""
    state = {
        "supervisor_pid": os.getpid(), "started_at": time.time(), "updated_at": time.time(),
        "phase": "failed", "error": message, "processes": [],
    }  # fmt: skip
    write_state(cfg, state)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmesh.launcher.supervisor")
    parser.add_argument("--config", default="none", help="config file, or 'none' for defaults + environment")
    parser.add_argument("--specs", type=Path, default=None, help="JSON process list (default: built from config)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config_path = None if args.config in ("", "none") else Path(args.config)
    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # outlive the terminal that started us
    try:
        specs = read_specs(args.specs) if args.specs else build_specs(cfg, config_path)
    except (LauncherError, OSError, ValueError, KeyError) as e:
        log.error("cannot build the process list: %s", e)
        _write_failed_state(cfg, f"cannot build the process list: {e}")
        return 1
    try:
        return asyncio.run(Supervisor(cfg, specs).run())
    except LauncherError as e:
        log.error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
