"""SIGKILL of a gateway under signed load loses no audit record: every call it answered
is in the security service's log once the next gateway has replayed the spool."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest

from llmesh.client import ApiKey, gateway_channel
from llmesh.pb.inference.v1 import inference_pb2 as pb
from llmesh.pb.inference.v1 import inference_pb2_grpc as pb_grpc
from llmesh.pb.security.v1 import security_pb2 as spb
from tests.support.gateways import Replica, replica
from tests.support.mesh import Mesh

CLIENTS = 8
KILL_AFTER = 150  # answered calls before the kill; the load goes on until it
HIGH = {k: {"requests": 1_000_000, "window_s": 60} for k in ("read", "write", "generate", "embed", "job", "admin")}


@pytest.fixture
def gateway(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    # An hour between deliveries: at the kill, every record is only in the spool.
    gw = replica(
        mesh.config_path,
        tmp_path_factory.mktemp("crash"),
        "doomed",
        {"rate_limits": HIGH, "audit_flush_interval_s": 3600},
    )
    gw.start()
    yield gw
    if gw.proc is not None:
        gw.stop()


def _audited(mesh: Mesh, actor: str) -> list[str]:
    """request_sha256 of every record of ``actor``, in sequence order."""
    out: list[str] = []
    after = 0
    while True:
        page = (
            mesh.security()
            .QueryAudit(spb.QueryAuditRequest(actor=actor, limit=1000, after_sequence=after), timeout=10)
            .records
        )
        if not page:
            return out
        out += [r.attributes["request_sha256"] for r in page]
        after = page[-1].sequence


def test_sigkill_under_signed_load_loses_no_audit_record(mesh: Mesh, gateway: Replica) -> None:
    owner = f"crash-{uuid.uuid4().hex[:8]}"
    created = mesh.security().CreateApiKey(
        spb.CreateApiKeyRequest(owner=owner, tenant="acme", scopes=["inference:*"]), timeout=10
    )
    key = ApiKey(created.key.key_id, created.secret)
    answered: list[str] = []  # digests of the request bodies the gateway answered
    lock = threading.Lock()
    enough = threading.Event()

    def client(n: int) -> None:
        stub = pb_grpc.InferenceStub(gateway_channel(gateway.address, key))
        for i in range(10_000):
            req = pb.GetConversationRequest(conversation_id=f"{n:04x}{i:012x}")  # a body of its own per call
            try:
                stub.GetConversation(req, timeout=10)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:  # the inference service's answer
                    return  # the gateway is gone: this call was not answered
            with lock:
                answered.append(hashlib.sha256(req.SerializeToString()).hexdigest())
                if len(answered) >= KILL_AFTER:
                    enough.set()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    assert enough.wait(120), "the load did not get going"
    gateway.kill()  # mid-load: calls are in flight
    for t in threads:
        t.join(30)
    assert _audited(mesh, owner) == []  # nothing was delivered before the kill

    gateway.start()  # the next gateway claims the killed one's spool and replays it
    deadline = time.monotonic() + 30
    while len(set(_audited(mesh, owner))) < len(answered):
        assert time.monotonic() < deadline, "spooled audit records were not replayed"
        time.sleep(0.3)
    audited = _audited(mesh, owner)
    assert not set(answered) - set(audited)  # zero missing
    assert len(audited) == len(set(audited))  # and none twice
    assert len(audited) - len(answered) <= CLIENTS  # beyond those: calls in flight at the kill
    assert mesh.security().VerifyAuditChain(spb.VerifyAuditChainRequest(), timeout=10).intact
