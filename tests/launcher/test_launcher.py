"""The launcher with real processes: a detached supervisor, a real redis-server and a
small stand-in gRPC service (grpc.health.v1, with a child process of its own, the way
tritonserver has stub children). No mocks.

The process list is injected (`up(..., specs=[...])`): the real inference service and
Triton model are covered by the full-mesh test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from llmesh.config import MeshConfig, load_config
from llmesh.launcher import LauncherError, RestartPolicy, Supervisor, build_specs, down, logs, status, up
from llmesh.launcher.processes import ProcessSpec, mesh_service_spec, redis_spec
from llmesh.launcher.state import pid_path, read_state, running_supervisor, write_specs
from tests.support.sandbox import free_ports

pytestmark = [
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed"),
    pytest.mark.timeout(60),
]

# A grpc.health.v1 server: NOT_SERVING for DELAY s, then SERVING; exits at once with
# code 4 while CRASH_FILE exists (to drive a crash loop). Its sleeping child shares
# its process group, like tritonserver's Python-backend stubs.
STANDIN = textwrap.dedent(
    """
    import os, signal, subprocess, sys, threading, time
    from concurrent import futures
    port, delay, crash_file = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    if os.path.exists(crash_file):
        sys.exit(4)
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    time.sleep(delay)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    print("standin serving on", port, flush=True)
    while not stop.wait(0.5):
        pass
    server.stop(1).wait()
    child.terminate()
    """
)
FAST = RestartPolicy(backoff_initial_s=0.2, backoff_max_s=0.4)


def _make_home(tmp: Path) -> tuple[MeshConfig, Path]:
    redis_port, grpc_port, http_port, metrics_port, svc_port = free_ports(5)
    path = tmp / "llmesh.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            home: {tmp / "home"}
            redis: {{port: {redis_port}}}
            triton: {{grpc_port: {grpc_port}, http_port: {http_port}, metrics_port: {metrics_port}}}
            inference:
              server: {{port: {svc_port}, metrics_port: 0}}
              peers: {{triton: "127.0.0.1:{grpc_port}", redis: "redis://127.0.0.1:{redis_port}/0"}}
            """
        )
    )
    return load_config(path, env={}), path


def _standin(cfg: MeshConfig, path: Path, tmp: Path, *, delay: float = 0.3, name: str = "inference") -> ProcessSpec:
    script = tmp / "standin.py"
    script.write_text(STANDIN)
    base = mesh_service_spec(cfg, path, "inference")  # the real service's env, port and grace
    argv = (sys.executable, str(script), str(base.port), str(delay), str(tmp / "crash"))
    return dataclasses.replace(base, name=name, argv=argv, restart=FAST, start_timeout_s=30)


def _wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _proc(cfg: MeshConfig, name: str) -> dict[str, Any]:
    state = read_state(cfg)
    assert state is not None
    return next(p for p in state["processes"] if p["name"] == name)


def _tree(pid: int) -> set[int]:
    try:
        p = psutil.Process(pid)
        return {pid, *(c.pid for c in p.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MeshConfig, Path]]:
    """redis + stand-in service, started by an `up` in a process that then exits."""
    tmp = tmp_path_factory.mktemp("mesh")
    cfg, path = _make_home(tmp)
    specs = tmp / "specs.json"
    write_specs(specs, [redis_spec(cfg), _standin(cfg, path, tmp)])
    code = (
        "import sys; from pathlib import Path\n"
        "from llmesh.launcher import up\n"
        "from llmesh.launcher.state import read_specs\n"
        "from llmesh.config import load_config\n"
        "up(load_config(sys.argv[1], env={}), Path(sys.argv[1]), 40, read_specs(Path(sys.argv[2])))\n"
    )
    argv = [sys.executable, "-c", code, str(path), str(specs)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=50, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    try:
        yield cfg, path
    finally:
        down(cfg, timeout=30)


def test_up_all_healthy_and_survives_its_parent(mesh: tuple[MeshConfig, Path]) -> None:
    cfg, _ = mesh
    sup = running_supervisor(cfg)
    assert sup is not None  # the process that ran `up` has exited; the daemon lives on
    state = read_state(cfg)
    assert state and state["supervisor_pid"] == sup and state["phase"] == "running"
    assert [p["name"] for p in state["processes"]] == ["redis", "inference"]
    for p in state["processes"]:
        assert p["state"] == "healthy" and p["restarts"] == 0 and p["last_exit_code"] is None
        assert Path(p["log"]).is_file() and _alive(p["pid"])
        assert os.getpgid(p["pid"]) == p["pid"]  # its own process group
    rows = status(cfg)
    assert [(r.name, r.state, r.health) for r in rows] == [
        ("redis", "healthy", "SERVING"),
        ("inference", "healthy", "SERVING"),
    ]
    assert rows[0].port == cfg.redis.port and rows[1].port == cfg.inference.server.port


def test_up_twice_is_idempotent(mesh: tuple[MeshConfig, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cfg, path = mesh
    before = running_supervisor(cfg)
    up(cfg, path, timeout=10, specs=[])  # specs ignored: already running
    assert "already running" in capsys.readouterr().out
    assert running_supervisor(cfg) == before


def test_logs_prints_tail(mesh: tuple[MeshConfig, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cfg, _ = mesh
    logs(cfg, "inference", lines=20)
    assert "standin serving on" in capsys.readouterr().out
    logs(cfg, None, lines=5)
    out = capsys.readouterr().out
    assert "[redis]" in out and "[supervisor]" in out
    with pytest.raises(LauncherError, match="no log for 'nope'"):
        logs(cfg, "nope")


def test_sigkill_child_is_restarted(mesh: tuple[MeshConfig, Path]) -> None:
    cfg, _ = mesh
    old = _proc(cfg, "inference")
    old_tree = _tree(old["pid"])
    assert len(old_tree) == 2  # the service and its child
    os.kill(old["pid"], signal.SIGKILL)
    new = _wait_for(
        lambda: (p := _proc(cfg, "inference"))["state"] == "healthy" and p["pid"] != old["pid"] and p,
        20, "inference restarted and healthy",
    )  # fmt: skip
    assert new["restarts"] == old["restarts"] + 1
    assert new["last_exit_code"] == -signal.SIGKILL
    # The dead leader's child went with it (group kill), not left as an orphan.
    _wait_for(lambda: not any(_alive(p) for p in old_tree), 5, "old process group gone")
    assert {r.name: r.health for r in status(cfg)} == {"redis": "SERVING", "inference": "SERVING"}


def test_down_leaves_no_orphans(mesh: tuple[MeshConfig, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cfg, _ = mesh
    state = read_state(cfg)
    assert state is not None
    sup = state["supervisor_pid"]
    pids = {sup} | set().union(*(_tree(p["pid"]) for p in state["processes"]))
    assert len(pids) >= 4  # supervisor, redis, service, service's child
    t0 = time.monotonic()
    assert down(cfg, timeout=30) is True
    assert time.monotonic() - t0 < 15  # graceful stops, no SIGKILL timeouts
    assert not [p for p in pids if _alive(p)]
    final = read_state(cfg)
    assert final and final["phase"] == "stopped"
    assert all(p["state"] == "stopped" for p in final["processes"])
    assert not pid_path(cfg).exists()
    assert status(cfg)[0].health == "DOWN"
    capsys.readouterr()
    assert down(cfg) is False  # idempotent
    assert "not running" in capsys.readouterr().out


def test_crash_loop_while_running(tmp_path: Path) -> None:
    cfg, path = _make_home(tmp_path)
    up(cfg, path, timeout=30, specs=[redis_spec(cfg), _standin(cfg, path, tmp_path, delay=0)])
    try:
        (tmp_path / "crash").touch()  # from now on every start exits with code 4
        os.kill(_proc(cfg, "inference")["pid"], signal.SIGKILL)
        rec = _wait_for(lambda: (p := _proc(cfg, "inference"))["state"] == "crash-loop" and p, 20, "crash-loop")
        assert rec["restarts"] == FAST.max_restarts and rec["last_exit_code"] == 4
        time.sleep(FAST.backoff_max_s * 2)
        assert _proc(cfg, "inference")["restarts"] == FAST.max_restarts  # restarting stopped
        # The rest of the mesh is unaffected and the supervisor stays up.
        assert running_supervisor(cfg) is not None
        assert _proc(cfg, "redis")["state"] == "healthy"
        assert "crash-loop" in (cfg.log_dir / "supervisor.log").read_text()
    finally:
        assert down(cfg, timeout=30) is True
    assert running_supervisor(cfg) is None


def test_crash_loop_at_start_fails_up(tmp_path: Path) -> None:
    cfg, path = _make_home(tmp_path)
    (tmp_path / "crash").touch()
    with pytest.raises(LauncherError) as err:
        up(cfg, path, timeout=30, specs=[redis_spec(cfg), _standin(cfg, path, tmp_path)])
    msg = str(err.value)
    assert "crash-loop" in msg and "inference" in msg and "llmesh: starting inference" in msg  # log tail
    state = read_state(cfg)
    assert state and state["phase"] == "failed"
    rec = _proc(cfg, "inference")
    assert rec["state"] == "crash-loop" and rec["restarts"] == FAST.max_restarts
    # The supervisor stopped what it had started and exited.
    assert _proc(cfg, "redis")["state"] == "stopped" and not _alive(_proc(cfg, "redis")["pid"])
    assert running_supervisor(cfg) is None and not pid_path(cfg).exists()


async def test_supervisor_in_process(tmp_path: Path) -> None:
    """The process list is injectable at the function level too: `Supervisor(cfg, specs)`."""
    cfg, path = _make_home(tmp_path)
    sup = Supervisor(cfg, [redis_spec(cfg), _standin(cfg, path, tmp_path, delay=0)])
    run = asyncio.create_task(sup.run(handle_signals=False))
    try:
        async with asyncio.timeout(20):
            while (read_state(cfg) or {}).get("phase") != "running":
                assert not run.done(), sup.error
                await asyncio.sleep(0.1)
        assert [c.state for c in sup.children] == ["healthy", "healthy"]
        assert pid_path(cfg).read_text().strip() == str(os.getpid())
        pids = set().union(*(_tree(c.pid) for c in sup.children if c.pid))
    finally:
        sup.request_stop()
        assert await asyncio.wait_for(run, 30) == 0
    assert not [p for p in pids if _alive(p)]
    assert (read_state(cfg) or {}).get("phase") == "stopped" and not pid_path(cfg).exists()


def test_port_taken_is_refused(tmp_path: Path) -> None:
    cfg, path = _make_home(tmp_path)
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", cfg.redis.port))
    squatter.listen()
    try:
        with pytest.raises(LauncherError, match=f"port 127.0.0.1:{cfg.redis.port} is already in use"):
            up(cfg, path, timeout=10, specs=[redis_spec(cfg)])
    finally:
        squatter.close()
    assert running_supervisor(cfg) is None and read_state(cfg) is None


def test_missing_redis_binary_is_a_clear_error(tmp_path: Path) -> None:
    cfg, _ = _make_home(tmp_path)
    cfg = cfg.model_copy(update={"redis": cfg.redis.model_copy(update={"binary": str(tmp_path / "no-redis")})})
    with pytest.raises(LauncherError, match="apt-get install redis-server"):
        redis_spec(cfg)


def test_the_mesh_starts_in_dependency_order(tmp_path: Path) -> None:
    """Every service of services/ is launched, peers before their callers, the gateway last."""
    cfg, path = _make_home(tmp_path)
    specs = build_specs(cfg, path)
    assert [s.name for s in specs] == [
        "redis", "security", "tritonserver", "inference", "trainer", "embedding", "retrieval", "gateway",
    ]  # fmt: skip
    by_name = {s.name: s for s in specs}
    for name, port, metrics in (
        ("embedding", cfg.embedding.server.port, cfg.embedding.server.metrics_port),
        ("retrieval", cfg.retrieval.server.port, cfg.retrieval.server.metrics_port),
    ):
        spec = by_name[name]
        assert spec.argv[1:] == ("-m", f"llmesh.services.{name}")
        assert spec.health.kind == "grpc" and spec.port == port and metrics in spec.all_ports()
    with pytest.raises(LauncherError, match="unknown service 'nope'"):
        mesh_service_spec(cfg, path, "nope")
