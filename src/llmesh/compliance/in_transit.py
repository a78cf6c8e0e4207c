"""Encryption in transit: every listen and peer address in the config, and the live
listening sockets of the mesh's processes (TLS is not implemented, so loopback only)."""

from __future__ import annotations

import psutil

from llmesh.compliance.addresses import display_url, host_of, is_loopback
from llmesh.compliance.findings import Check, Finding, make_check
from llmesh.config import MeshConfig
from llmesh.launcher.state import is_alive, read_state, state_path
from llmesh.runtime.config import ServerSettings


def bind_hosts(cfg: MeshConfig) -> dict[str, str]:
    """Every listen host the config sets (tritonserver has no setting: see live sockets)."""
    return {
        "inference.server.host": cfg.inference.server.host,
        "security.server.host": cfg.security.server.host,
        "gateway.server.host": cfg.gateway.server.host,
        "redis.host": cfg.redis.host,
    }


def peer_addresses(cfg: MeshConfig) -> dict[str, str]:
    """Every address a service dials: plaintext gRPC/RESP, so each must stay on the host."""
    peers = {
        "inference.peers.triton": cfg.inference.peers.triton,
        "inference.peers.redis": cfg.inference.peers.redis,
        "gateway.peers.security": cfg.gateway.peers.security,
        "gateway.peers.redis": cfg.gateway.peers.redis,
    }
    return peers | {f"gateway.upstreams[{name}]": addr for name, addr in cfg.gateway.upstreams.items()}


def tls_settings() -> list[str]:
    """Server settings that would configure TLS; none exist yet."""
    return [name for name in ServerSettings.model_fields if "tls" in name or "cert" in name]


def transit_config_findings(cfg: MeshConfig) -> list[Finding]:
    out: list[Finding] = []
    for key, host in bind_hosts(cfg).items():
        if is_loopback(host):
            out.append(("pass", f"{key}={host} (loopback)"))
        else:
            out.append(("fail", f"{key}={host} is not loopback and TLS is not implemented: traffic in clear"))
    peers = peer_addresses(cfg)
    remote = {k: a for k, a in peers.items() if not is_loopback(host_of(a))}
    out += [
        ("fail", f"{k}={display_url(a)} leaves the host in clear (TLS is not implemented)") for k, a in remote.items()
    ]
    if not remote:
        out.append(("pass", f"all {len(peers)} peer/upstream addresses are loopback"))
    tls = tls_settings()
    out.append(
        (
            "pass",
            f"TLS settings: {', '.join(tls)}"
            if tls
            else "loopback only; TLS not configured (ServerSettings has no TLS fields)",
        )
    )
    return out


def listening_sockets(cfg: MeshConfig) -> list[tuple[str, str, int]] | None:
    """(process, ip, port) of every LISTEN socket of the mesh's live processes and their
    children, from the launcher's state file; None when no mesh process is alive."""
    out: list[tuple[str, str, int]] = []
    alive = False
    for rec in (read_state(cfg) or {}).get("processes", []):
        pid = rec.get("pid")
        if not pid or not is_alive(pid, rec.get("create_time")):
            continue
        alive = True
        try:
            proc = psutil.Process(pid)
            for p in (proc, *proc.children(recursive=True)):
                out += [
                    (str(rec["name"]), c.laddr.ip, c.laddr.port)
                    for c in p.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN
                ]
        except psutil.Error:
            continue  # exited meanwhile
    return out if alive else None


def live_socket_findings(cfg: MeshConfig) -> list[Finding]:
    sockets = listening_sockets(cfg)
    if sockets is None:
        return [("warn", f"live listening sockets not checked: no live mesh process in {state_path(cfg)}")]
    exposed = [f"{name} {ip}:{port}" for name, ip, port in sockets if not is_loopback(ip)]
    if exposed:
        return [("fail", f"listening beyond loopback: {', '.join(exposed)}")]
    by_proc: dict[str, list[str]] = {}
    for name, ip, port in sorted(sockets):
        by_proc.setdefault(name, []).append(f"{ip}:{port}")
    listing = "; ".join(f"{k} {' '.join(v)}" for k, v in by_proc.items())
    return [("pass", f"live LISTEN sockets of mesh processes, all loopback: {listing}")]


def encryption_in_transit(cfg: MeshConfig) -> Check:
    return make_check(
        "encryption_in_transit", "Encryption in transit", [*transit_config_findings(cfg), *live_socket_findings(cfg)]
    )
