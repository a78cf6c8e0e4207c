"""Live, read-only probes shared by several checks: file modes, Redis ``CONFIG GET`` and
a gRPC call without identity. Each is bounded by PROBE_TIMEOUT_S and never writes."""

from __future__ import annotations

import stat
from pathlib import Path

import grpc
import redis

from llmesh.compliance.findings import Finding
from llmesh.config import MeshConfig

# Reaching a service, or finding it down, must not stall the report.
PROBE_TIMEOUT_S = 2.0
_NO_PROXY = [("grpc.enable_http_proxy", 0)]  # an http_proxy must not reroute loopback probes


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def private_file(path: Path, what: str) -> Finding:
    """A secret file must exist and be readable by its owner only."""
    if not path.is_file():
        return "fail", f"{what} {path} is missing"
    m = mode(path)
    if m & 0o077:
        return "fail", f"{what} {path} has mode {m:04o}: readable by group/others (want 0600)"
    return "pass", f"{what} {path}: mode {m:04o}, {path.stat().st_size} bytes"


def security_dir(cfg: MeshConfig) -> Path:
    return cfg.home / "security"


def redis_config(url: str, *params: str) -> dict[str, str]:
    """``CONFIG GET`` of each parameter on the live Redis (raises ``redis.RedisError``)."""
    client = redis.Redis.from_url(
        url, socket_timeout=PROBE_TIMEOUT_S, socket_connect_timeout=PROBE_TIMEOUT_S, decode_responses=True
    )
    try:
        out: dict[str, str] = {}
        for p in params:
            out.update({str(k): str(v) for k, v in client.config_get(p).items()})
        return out
    finally:
        client.close()


def call_without_identity(target: str, method: str) -> grpc.StatusCode:
    """One unary call carrying no metadata at all (an empty request is valid for any
    message type); OK if the service answered it."""
    with grpc.insecure_channel(target, options=_NO_PROXY) as channel:
        call = channel.unary_unary(method, request_serializer=_raw, response_deserializer=_raw)
        try:
            call(b"", timeout=PROBE_TIMEOUT_S)
        except grpc.RpcError as e:
            code = getattr(e, "code", None)  # the error is a grpc.Call; RpcError itself has no code()
            status: grpc.StatusCode = code() if callable(code) else grpc.StatusCode.UNKNOWN
            return status
    return grpc.StatusCode.OK


def _raw(data: bytes) -> bytes:
    return data


def unauthenticated_probe(label: str, target: str, method: str) -> Finding:
    code = call_without_identity(target, method)
    seen = f"{label} {target} {method} without identity → {code.name}"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return "pass", seen
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return "fail", f"{label} unreachable at {target} ({code.name}): cannot show it refuses anonymous calls"
    return "fail", f"{seen}, expected UNAUTHENTICATED"
