"""Two more gateway replicas beside the session mesh, sharing a Redis of their own: rate
limits hold across replicas, Redis can be stopped and restarted under them, and no
audit record is lost when a replica is stopped (or when the security service cannot
take the records at that moment)."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import yaml

from llmesh.auth.signature import sign
from llmesh.client import ApiKey, describe_error, gateway_channel
from llmesh.pb.inference.v1 import inference_pb2 as pb
from llmesh.pb.inference.v1 import inference_pb2_grpc as pb_grpc
from llmesh.pb.security.v1 import security_pb2 as spb
from llmesh.services.gateway.audit import spooled_records
from tests.support.gateways import Replica, replica
from tests.support.mesh import Mesh
from tests.support.sandbox import RedisServer

READ_LIMIT = 20  # read calls per principal per minute, on both replicas
LIST = "/llmesh.inference.v1.Inference/ListTemplates"


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    srv = RedisServer()
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def replicas(mesh: Mesh, redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Replica]]:
    folder = tmp_path_factory.mktemp("replicas")
    limits = {k: {"requests": 10_000, "window_s": 60} for k in ("read", "write", "generate", "embed", "job", "admin")}
    gw = {
        "peers": {**yaml.safe_load(mesh.config_path.read_text())["gateway"]["peers"], "redis": redis.url},
        "rate_limits": {**limits, "read": {"requests": READ_LIMIT, "window_s": 60}},
        # Long enough that only the shutdown flush can deliver a replica's records in time.
        "audit_flush_interval_s": 3600,
    }
    out = [replica(mesh.config_path, folder, f"replica{i}", gw) for i in range(2)]
    for r in out:
        r.start()
    yield out
    for r in out:
        if r.proc is not None:
            r.stop()


def _key(mesh: Mesh, owner: str, scopes: list[str]) -> ApiKey:
    created = mesh.security().CreateApiKey(
        spb.CreateApiKeyRequest(owner=owner, tenant="acme", scopes=scopes), timeout=10
    )
    return ApiKey(created.key.key_id, created.secret)


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_rate_limit_is_shared_by_replicas(mesh: Mesh, replicas: list[Replica]) -> None:
    key = _key(mesh, f"burst-{uuid.uuid4().hex[:8]}", ["inference:read"])
    stubs = [pb_grpc.InferenceStub(gateway_channel(r.address, key)) for r in replicas]

    def call(i: int) -> grpc.StatusCode:
        return _code(lambda: stubs[i % 2].ListTemplates(pb.ListTemplatesRequest(), timeout=20))

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(call, range(3 * READ_LIMIT)))
    assert codes.count(grpc.StatusCode.OK) == READ_LIMIT  # exactly the limit, across both replicas
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 2 * READ_LIMIT
    try:
        stubs[0].ListTemplates(pb.ListTemplatesRequest(), timeout=20)
        raise AssertionError("admitted over the limit")
    except grpc.RpcError as e:
        failure = describe_error(e)
        assert failure.code == "RESOURCE_EXHAUSTED" and failure.retry_after_s and 0 < failure.retry_after_s <= 60


def test_redis_stopped_and_restarted_under_the_replicas(
    mesh: Mesh, replicas: list[Replica], redis: RedisServer
) -> None:
    key = _key(mesh, f"outage-{uuid.uuid4().hex[:8]}", ["inference:read", "inference:chat"])
    token = mesh.security().IssueToken(spb.IssueTokenRequest(key_id=key.key_id, secret=key.secret), timeout=10).token
    a = pb_grpc.InferenceStub(gateway_channel(replicas[0].address, key))
    read = lambda: a.ListTemplates(pb.ListTemplatesRequest(), timeout=20)  # noqa: E731 - read class: fails open
    write = lambda: a.DeleteConversation(pb.DeleteConversationRequest(conversation_id="c" * 16), timeout=20)  # noqa: E731
    assert _code(read) == _code(write) == grpc.StatusCode.OK

    redis.stop()
    try:
        assert _code(read) == grpc.StatusCode.OK
        assert _code(write) == grpc.StatusCode.UNAVAILABLE  # writes fail closed
        # Replay protection still holds on the replica (its own nonce memory).
        body = pb.ListTemplatesRequest().SerializeToString()
        md: tuple[tuple[str, str | bytes], ...] = (
            ("authorization", f"Bearer {token}"),
            *sign(key.secret.encode(), LIST, body, key_id=key.key_id),
        )
        raw = pb_grpc.InferenceStub(grpc.insecure_channel(replicas[0].address))
        assert (
            _code(lambda: raw.ListTemplates(pb.ListTemplatesRequest(), metadata=md, timeout=20)) == grpc.StatusCode.OK
        )
        assert (
            _code(lambda: raw.ListTemplates(pb.ListTemplatesRequest(), metadata=md, timeout=20))
            == grpc.StatusCode.UNAUTHENTICATED
        )
    finally:
        redis.start()  # same port, empty
    deadline = time.monotonic() + 15
    while _code(write) != grpc.StatusCode.OK:  # recovers by itself
        assert time.monotonic() < deadline, "gateway did not recover after Redis came back"
        time.sleep(0.2)
    b = pb_grpc.InferenceStub(gateway_channel(replicas[1].address, key))
    assert (
        _code(lambda: b.DeleteConversation(pb.DeleteConversationRequest(conversation_id="c" * 16), timeout=20))
        == grpc.StatusCode.OK
    )


def _audited(mesh: Mesh, actor: str) -> int:
    return len(mesh.security().QueryAudit(spb.QueryAuditRequest(actor=actor, limit=1000), timeout=10).records)


def test_no_audit_record_is_lost_when_a_replica_stops(mesh: Mesh, replicas: list[Replica]) -> None:
    owner = f"audited-{uuid.uuid4().hex[:8]}"
    key = _key(mesh, owner, ["inference:read"])
    stub = pb_grpc.InferenceStub(gateway_channel(replicas[1].address, key))
    n = 12
    for _ in range(n):
        stub.ListTemplates(pb.ListTemplatesRequest(), timeout=20)
    assert _audited(mesh, owner) == 0  # still batched in the replica (flush interval 1 h)
    assert replicas[1].stop() == 0
    assert _audited(mesh, owner) == n  # the clean shutdown delivered every record
    replicas[1].start()
    assert (
        _code(
            lambda: pb_grpc.InferenceStub(gateway_channel(replicas[1].address, key)).ListTemplates(
                pb.ListTemplatesRequest(), timeout=20
            )
        )
        == grpc.StatusCode.OK
    )


def test_audit_is_spooled_when_security_is_down_at_shutdown(mesh: Mesh, replicas: list[Replica]) -> None:
    owner = f"spooled-{uuid.uuid4().hex[:8]}"
    key = _key(mesh, owner, ["inference:read"])
    stub = pb_grpc.InferenceStub(gateway_channel(replicas[0].address, key))
    n = 7
    for _ in range(n):
        stub.ListTemplates(pb.ListTemplatesRequest(), timeout=20)
    security_pid = mesh.pid("security")
    os.kill(security_pid, signal.SIGSTOP)  # unreachable, without the supervisor restarting it
    try:
        assert replicas[0].stop() == 0
    finally:
        os.kill(security_pid, signal.SIGCONT)
    spool = mesh.cfg.home / "gateway" / "audit-spool"
    assert spooled_records(spool) >= n  # durable since each call was answered
    assert _audited(mesh, owner) == 0
    replicas[0].start()  # claims the stopped replica's segment and delivers it first
    deadline = time.monotonic() + 15
    while _audited(mesh, owner) != n:
        assert time.monotonic() < deadline, "spooled audit records were not delivered"
        time.sleep(0.3)
    assert _audited(mesh, owner) == n  # once each
    assert mesh.security().VerifyAuditChain(spb.VerifyAuditChainRequest(), timeout=10).intact
