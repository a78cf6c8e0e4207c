"""Health probes, one per kind of process. Each answers SERVING, NOT_SERVING or DOWN.

DOWN: nothing answers on the port. NOT_SERVING: something answers but is not ready
(Triton still loading a model, a service still warming up). Probes are blocking and
short; the supervisor runs them in a thread.
"""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Literal

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmesh.launcher.processes import HealthCheck
from llmesh.runtime.files import address

Health = Literal["SERVING", "NOT_SERVING", "DOWN"]
SERVING: Health = "SERVING"
NOT_SERVING: Health = "NOT_SERVING"
DOWN: Health = "DOWN"


def probe_redis(host: str, port: int, timeout: float = 1.0) -> Health:
    client = redis.Redis(host=host, port=port, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return SERVING if client.ping() else NOT_SERVING
    except redis.ConnectionError:
        return DOWN
    except redis.RedisError:  # e.g. LOADING: up but not ready
        return NOT_SERVING
    finally:
        client.close()


# No proxies: an http_proxy in the environment must not reroute loopback probes.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_status(url: str, timeout: float) -> int | None:
    """HTTP status of a GET, or None when nothing answers."""
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (urllib.error.URLError, OSError):
        return None


def probe_triton(host: str, port: int, models: tuple[str, ...] = (), timeout: float = 1.0) -> Health:
    """Server ready (`/v2/health/ready`) and every listed model ready, over HTTP."""
    base = f"http://{address(host, port)}/v2"
    status = _http_status(f"{base}/health/ready", timeout)
    if status is None:
        return DOWN
    if status != 200:
        return NOT_SERVING
    for model in models:
        if _http_status(f"{base}/models/{urllib.parse.quote(model)}/ready", timeout) != 200:
            return NOT_SERVING
    return SERVING


def probe_grpc(host: str, port: int, timeout: float = 1.0, service: str = "") -> Health:
    """grpc.health.v1 Check; `service=""` asks about the server as a whole."""
    # No proxy: grpc honours http_proxy too, which must not reroute loopback probes.
    with grpc.insecure_channel(address(host, port), options=[("grpc.enable_http_proxy", 0)]) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            call: Any = e  # a sync call's error is also its grpc.Call; the stubs cannot say so
            code = call.code() if hasattr(call, "code") else None
            # UNAVAILABLE: nothing listens. Anything else (a hung or unimplemented
            # health service) answers, so it is up but not serving.
            return DOWN if code == grpc.StatusCode.UNAVAILABLE else NOT_SERVING
    return SERVING if reply.status == health_pb2.HealthCheckResponse.SERVING else NOT_SERVING


def probe(check: HealthCheck, timeout: float = 1.0) -> Health:
    if check.kind == "redis":
        return probe_redis(check.host, check.port, timeout)
    if check.kind == "triton":
        return probe_triton(check.host, check.port, check.models, timeout)
    if check.kind == "grpc":
        return probe_grpc(check.host, check.port, timeout)
    raise ValueError(f"unknown health check kind: {check.kind!r}")
