"""The gateway in front of the real mesh: signed, authorized, rate-limited, masked,
audited calls pass; every kind of forged or replayed call is refused."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from llmesh.auth.signature import sign
from llmesh.client import ApiKey, SigningInterceptor, TokenSource, gateway_channel, local_channel, sampling
from llmesh.pb.inference.v1 import inference_pb2 as pb
from llmesh.pb.inference.v1 import inference_pb2_grpc as pb_grpc
from llmesh.pb.security.v1 import security_pb2 as spb
from llmesh.pb.security.v1 import security_pb2_grpc as spb_grpc
from llmesh.runtime.identity import Principal
from tests.support.mesh import Mesh

GENERATE = "/llmesh.inference.v1.Inference/Generate"


def _key(mesh: Mesh, scopes: list[str], tenant: str = "acme") -> tuple[ApiKey, str]:
    sec = mesh.security()
    created = sec.CreateApiKey(spb.CreateApiKeyRequest(owner="app", tenant=tenant, scopes=scopes), timeout=10)
    key = ApiKey(created.key.key_id, created.secret)
    token = sec.IssueToken(spb.IssueTokenRequest(key_id=key.key_id, secret=key.secret), timeout=10).token
    return key, token


@pytest.fixture(scope="module")
def creds(mesh: Mesh) -> tuple[ApiKey, str]:
    return _key(mesh, ["inference:*"])


@pytest.fixture(scope="module")
def gateway(mesh: Mesh) -> Iterator[grpc.Channel]:
    ch = grpc.insecure_channel(f"127.0.0.1:{mesh.cfg.gateway.server.port}")
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def signed(gateway: grpc.Channel, creds: tuple[ApiKey, str]) -> pb_grpc.InferenceStub:
    key, token = creds
    channel = grpc.intercept_channel(gateway, SigningInterceptor(key, TokenSource(lambda: (token, time.time() + 600))))
    return pb_grpc.InferenceStub(channel)


def test_signed_calls_pass_in_every_shape(signed: pb_grpc.InferenceStub) -> None:
    r, call = signed.Generate.with_call(
        pb.GenerateRequest(prompt="hello", sampling=sampling(max_tokens=4, seed=1)), timeout=30
    )
    ids = [v for k, v in call.trailing_metadata() if k == "x-request-id"]
    assert len(ids) == 1 and ids[0]  # one request id, the same at the gateway and the service
    assert r.usage.completion_tokens > 0
    streamed = "".join(
        m.text_delta
        for m in signed.GenerateStream(
            pb.GenerateRequest(prompt="hello", sampling=sampling(max_tokens=4, seed=1)), timeout=30
        )
    )
    assert streamed == r.text
    turns = [pb.ChatRequest(message=m, sampling=sampling(max_tokens=3)) for m in ("hi", "again")]
    finals = [m for m in signed.Converse(iter(turns), timeout=30) if m.finish_reason]
    assert [m.history_length for m in finals] == [2, 4]


def test_reflection_and_health_through_the_gateway(gateway: grpc.Channel) -> None:
    services = set(ProtoReflectionDescriptorDatabase(gateway).get_services())
    assert {"llmesh.inference.v1.Inference", "llmesh.security.v1.Security", "grpc.health.v1.Health"} <= services
    status = health_pb2_grpc.HealthStub(gateway).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def _raw(gateway: grpc.Channel, md: list[tuple[str, str]], request: pb.GenerateRequest) -> grpc.StatusCode:
    try:
        pb_grpc.InferenceStub(gateway).Generate(request, metadata=tuple(md), timeout=30)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_attacks_are_refused(mesh: Mesh, gateway: grpc.Channel, creds: tuple[ApiKey, str]) -> None:
    key, token = creds
    req = pb.GenerateRequest(prompt="hi", sampling=sampling(max_tokens=2))
    body = req.SerializeToString()
    auth = [("authorization", f"Bearer {token}")]
    good = auth + sign(key.secret.encode(), GENERATE, body, key_id=key.key_id)
    assert _raw(gateway, good, req) == grpc.StatusCode.OK
    unauth = grpc.StatusCode.UNAUTHENTICATED
    assert _raw(gateway, good, req) == unauth  # the same nonce again: replay
    assert _raw(gateway, [], req) == unauth  # no credentials
    assert (
        _raw(
            gateway,
            [("authorization", "Bearer not.a.jwt")] + sign(key.secret.encode(), GENERATE, body, key_id=key.key_id),
            req,
        )
        == unauth
    )
    assert _raw(gateway, auth, req) == unauth  # token without a signature
    tampered = pb.GenerateRequest(prompt="something else", sampling=sampling(max_tokens=2))
    assert _raw(gateway, auth + sign(key.secret.encode(), GENERATE, body, key_id=key.key_id), tampered) == unauth
    assert _raw(gateway, auth + sign(b"wrong-secret", GENERATE, body, key_id=key.key_id), req) == unauth
    stale = sign(key.secret.encode(), GENERATE, body, key_id=key.key_id, now=time.time() - 3600)
    future = sign(key.secret.encode(), GENERATE, body, key_id=key.key_id, now=time.time() + 3600)
    assert _raw(gateway, auth + stale, req) == unauth
    assert _raw(gateway, auth + future, req) == unauth
    other_method = sign(key.secret.encode(), "/llmesh.inference.v1.Inference/Chat", body, key_id=key.key_id)
    assert _raw(gateway, auth + other_method, req) == unauth
    # Authenticated and signed, but the key lacks the method's scope.
    reader, reader_token = _key(mesh, ["inference:read"])
    md = [("authorization", f"Bearer {reader_token}")] + sign(
        reader.secret.encode(), GENERATE, body, key_id=reader.key_id
    )
    assert _raw(gateway, md, req) == grpc.StatusCode.PERMISSION_DENIED
    # A valid token of one key with the signature of another.
    md = auth + sign(reader.secret.encode(), GENERATE, body, key_id=reader.key_id)
    assert _raw(gateway, md, req) == unauth
    # Every refusal is audited with its status and reason (never a credential).
    deadline = time.monotonic() + 15
    while True:
        records = mesh.security().QueryAudit(spb.QueryAuditRequest(action=GENERATE, limit=1000), timeout=10).records
        refused = [r for r in records if r.outcome in ("UNAUTHENTICATED", "PERMISSION_DENIED")]
        if len(refused) >= 11:
            break
        assert time.monotonic() < deadline, f"refusals not audited: {len(refused)}"
        time.sleep(0.3)
    assert any(r.outcome == "PERMISSION_DENIED" and "inference:generate" in r.attributes["reason"] for r in refused)
    assert any(r.attributes["reason"] == "replayed nonce" for r in refused)
    assert token not in str(records) and key.secret not in str(records)


def test_pii_is_masked_before_the_model_and_audited_without_values(mesh: Mesh, signed: pb_grpc.InferenceStub) -> None:
    reply = signed.Chat(
        pb.ChatRequest(message="我的手机是13812348000,邮箱zhang.san@example.com", sampling=sampling(max_tokens=3)),
        timeout=30,
    )
    # Read straight from the service as someone of the same tenant: what the model saw.
    acme = Principal("auditor", "acme", frozenset({"inference:*"}))
    direct = pb_grpc.InferenceStub(local_channel(mesh.address, mesh.cfg.home, acme))
    stored = direct.GetConversation(pb.GetConversationRequest(conversation_id=reply.conversation_id), timeout=10)
    user_turn = stored.messages[0].content
    assert "13812348000" not in user_turn and "<PHONE_1>" in user_turn and "<EMAIL_1>" in user_turn
    deadline = time.monotonic() + 15
    sec = mesh.security()
    while True:
        records = sec.QueryAudit(
            spb.QueryAuditRequest(action="/llmesh.inference.v1.Inference/Chat", actor="app", limit=1000), timeout=10
        ).records
        if any("cn_mobile=1" in str(r) for r in records):
            break
        assert time.monotonic() < deadline, "no audit record arrived"
        time.sleep(0.3)
    text = str(records)
    assert "13812348000" not in text and "cn_mobile=1" in text
    assert sec.VerifyAuditChain(spb.VerifyAuditChainRequest(), timeout=10).intact


def test_cli_keys_and_token(mesh: Mesh) -> None:
    import subprocess
    import sys

    def cli(*args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "llmesh.cli", *args, "--config", str(mesh.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    created = dict(
        line.split("=", 1) for line in cli("keys", "create", "--owner", "ops", "--scope", "inference:read").split()
    )
    assert created["key_id"] in cli("keys", "list", "--owner", "ops")
    jwt_token = cli("token", "--key-id", created["key_id"], "--secret", created["secret"]).strip()
    assert jwt_token.count(".") == 2
    # A call of this key's own, so the audit query below does not depend on other tests.
    key = ApiKey(created["key_id"], created["secret"])
    with gateway_channel(f"127.0.0.1:{mesh.cfg.gateway.server.port}", key) as ch:
        pb_grpc.InferenceStub(ch).ListTemplates(pb.ListTemplatesRequest(), timeout=30)
    deadline = time.monotonic() + 30  # the gateway delivers audit records in batches
    while "/llmesh.inference.v1.Inference/ListTemplates" not in cli("audit", "query", "--actor", "ops", "--limit", "5"):
        assert time.monotonic() < deadline, "the key's call never reached the audit log"
        time.sleep(0.5)
    cli("keys", "revoke", created["key_id"])
    assert cli("audit", "verify").startswith("intact:")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmesh.cli",
            "token",
            "--key-id",
            created["key_id"],
            "--secret",
            created["secret"],
            "--config",
            str(mesh.config_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "FAILED_PRECONDITION" in out.stderr


def test_tenants_cannot_see_each_others_conversations(mesh: Mesh, signed: pb_grpc.InferenceStub) -> None:
    reply = signed.Chat(pb.ChatRequest(message="private", sampling=sampling(max_tokens=2)), timeout=30)
    cid = reply.conversation_id
    assert signed.GetConversation(pb.GetConversationRequest(conversation_id=cid), timeout=10).messages
    other, _ = _key(mesh, ["inference:*"], tenant="globex")
    stranger = pb_grpc.InferenceStub(gateway_channel(f"127.0.0.1:{mesh.cfg.gateway.server.port}", other))
    with pytest.raises(grpc.RpcError) as e:
        stranger.GetConversation(pb.GetConversationRequest(conversation_id=cid), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # Deleting it as the other tenant deletes nothing; the owner still has it.
    assert not stranger.DeleteConversation(pb.DeleteConversationRequest(conversation_id=cid), timeout=10).deleted
    assert signed.GetConversation(pb.GetConversationRequest(conversation_id=cid), timeout=10).messages


def test_sdk_fetches_and_refreshes_tokens_through_the_gateway(mesh: Mesh) -> None:
    key, _ = _key(mesh, ["inference:read"])
    channel = gateway_channel(f"127.0.0.1:{mesh.cfg.gateway.server.port}", key, ttl_s=2, refresh_margin_s=30)
    stub = pb_grpc.InferenceStub(channel)
    tokens = channel._interceptor.tokens  # type: ignore[attr-defined]
    assert stub.ListTemplates(pb.ListTemplatesRequest(), timeout=10).templates
    assert tokens.fetches == 1
    time.sleep(1.2)  # past half of the 2 s lifetime: the next call refreshes first
    assert stub.ListTemplates(pb.ListTemplatesRequest(), timeout=10).templates
    assert tokens.fetches == 2
    time.sleep(2.5)  # the first token has expired by now; calls still pass
    assert stub.ListTemplates(pb.ListTemplatesRequest(), timeout=10).templates


def test_services_enforce_the_method_scope_themselves(mesh: Mesh) -> None:
    """Defence in depth: a valid internal identity without the method's scope is refused
    by the service itself, not only by the gateway."""
    weak = Principal("someone", "acme", frozenset({"inference:read"}))
    sec = spb_grpc.SecurityStub(local_channel(f"127.0.0.1:{mesh.cfg.security.server.port}", mesh.cfg.home, weak))
    with pytest.raises(grpc.RpcError) as e:
        sec.CreateApiKey(spb.CreateApiKeyRequest(owner="x", tenant="acme", scopes=["*"]), timeout=10)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "security:admin" in (e.value.details() or "")
    inf = pb_grpc.InferenceStub(local_channel(mesh.address, mesh.cfg.home, weak))
    assert inf.ListTemplates(pb.ListTemplatesRequest(), timeout=10).templates
    with pytest.raises(grpc.RpcError) as e:
        inf.Generate(pb.GenerateRequest(prompt="hi", sampling=sampling(max_tokens=2)), timeout=10)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
