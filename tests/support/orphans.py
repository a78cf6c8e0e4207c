"""The launcher's promise at ``llmesh down``: no process of the mesh outlives it
(tritonserver's Python-backend stubs included). Checked where the session's mesh is
stopped (the ``mesh`` fixture's finalizer in tests/conftest.py), so the check runs
after every other test by construction, whatever the files are called."""

from __future__ import annotations

import psutil

from llmesh.config import MeshConfig
from llmesh.launcher import control
from llmesh.launcher.state import read_state


def mesh_processes(cfg: MeshConfig) -> set[int]:
    """The supervisor, every process it recorded, and all their descendants, now."""
    state = read_state(cfg) or {}
    roots = {state.get("supervisor_pid")} | {p.get("pid") for p in state.get("processes", [])}
    family: set[int] = set()
    for pid in filter(None, roots):
        try:
            family |= {pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))}
        except psutil.NoSuchProcess:
            pass
    return family


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def down_leaves_no_orphans(cfg: MeshConfig) -> None:
    """``control.down`` stops a running mesh, and nothing of it is left alive after.
    The mesh is stopped first, whatever the checks then find."""
    state = read_state(cfg) or {"processes": []}
    family = mesh_processes(cfg)
    assert control.down(cfg), "llmesh down found nothing running"
    left = sorted(p for p in family if _alive(p))
    assert left == [], f"processes outlived `llmesh down`: {left}"
    assert all(r.health == "DOWN" for r in control.status(cfg))
    if any(p["name"] == "tritonserver" for p in state["processes"]):
        # The backend stubs are tritonserver's children: the check must have seen them.
        assert len(family) > len(state["processes"]) + 1, "tritonserver's backend stubs were not found"
