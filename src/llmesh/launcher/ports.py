"""Ports the mesh binds: refuse to start over someone else's server with a clear
error naming the owner, instead of a process that crash-loops on a taken port."""

from __future__ import annotations

import socket
from collections.abc import Sequence

import psutil

from llmesh.launcher.processes import LOOPBACK, LauncherError, ProcessSpec
from llmesh.runtime.files import address


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
    """Every port of every spec is free, or a LauncherError naming the process and the owner."""
    for spec in specs:
        for port in spec.all_ports():
            if not port_is_free(port):
                raise LauncherError(
                    f"{spec.name}: port {address(LOOPBACK, port)} is already in use by {port_owner(port)}; "
                    "stop it or choose another port in the config"
                )
