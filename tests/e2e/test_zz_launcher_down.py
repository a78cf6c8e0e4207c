"""Runs last: the launcher brings the whole mesh down with no orphan processes."""

from __future__ import annotations

import psutil

from llmesh.launcher import control
from tests.conftest import Mesh


def test_down_leaves_no_orphans(mesh: Mesh) -> None:
    state = mesh.state()
    pids = {state["supervisor_pid"]} | {p["pid"] for p in state["processes"] if p.get("pid")}
    family = set(pids)
    for pid in pids:
        try:
            family |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
    assert len(family) > len(state["processes"])  # tritonserver's backend stubs are in there too
    assert control.down(mesh.cfg)
    alive = [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert alive == []
    rows = {r.name: r for r in control.status(mesh.cfg)}
    assert all(r.health == "DOWN" for r in rows.values())
