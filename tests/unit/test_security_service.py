"""The security service in-process: the real servicer (built by the same ``build()``
as ``python -m llmesh.services.security``) on a loopback aio server with the
runtime's error interceptor, a temporary LLMESH_HOME, called through the stubs."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import pytest_asyncio
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmesh.auth import pii
from llmesh.config import ConfigError, MeshConfig, load_config
from llmesh.pb.common.v1 import options_pb2
from llmesh.pb.security.v1 import security_pb2 as pb
from llmesh.pb.security.v1 import security_pb2_grpc as pb_grpc
from llmesh.runtime.errors import Unauthenticated
from llmesh.runtime.interceptors import ErrorMappingInterceptor
from llmesh.services.gateway.masking import DEFAULT_OPERATORS, Masker, Vault
from llmesh.services.security.__main__ import build
from tests.support.pii import NEGATIVE, POSITIVE
from tests.support.sandbox import free_ports

Code = grpc.StatusCode


def mesh_config(home: Path, gateway: dict[str, Any] | None = None, **security: object) -> MeshConfig:
    path = home / "llmesh.yaml"
    doc: dict[str, Any] = {"home": str(home), "security": {"server": {"port": 0, "metrics_port": 0}, **security}}
    if gateway:
        doc["gateway"] = gateway
    path.write_text(yaml.safe_dump(doc))
    return load_config(path, env={})


@dataclass
class Running:
    stub: pb_grpc.SecurityAsyncStub
    cfg: MeshConfig

    @property
    def db_path(self) -> Path:
        return self.cfg.home / "security" / "security.db"


@contextlib.asynccontextmanager
async def running(
    home: Path, *, warm: bool = True, gateway: dict[str, Any] | None = None, **security: object
) -> AsyncIterator[Running]:
    cfg = mesh_config(home, gateway, **security)
    svc = build(cfg)
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()])
    svc.register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        if warm:
            assert svc.warmup is not None
            await svc.warmup()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield Running(pb_grpc.SecurityStub(ch), cfg)
    finally:
        await server.stop(None)
        if svc.close is not None:
            await svc.close()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def sec(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    async with running(tmp_path_factory.mktemp("sec-home"), token_ttl_seconds=600) as r:
        yield r


async def expect(code: grpc.StatusCode, call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    assert e.value.code() == code, e.value.details()
    return e.value


async def new_key(
    stub: pb_grpc.SecurityAsyncStub,
    owner: str = "alice",
    scopes: tuple[str, ...] = ("inference:generate", "embedding:embed"),
    **kw: Any,
) -> pb.CreateApiKeyResponse:
    return await stub.CreateApiKey(pb.CreateApiKeyRequest(owner=owner, scopes=scopes, roles=["user"], **kw))


async def verify(stub: pb_grpc.SecurityAsyncStub, token: str, cfg: MeshConfig) -> dict[str, Any]:
    jwks = jwt.PyJWKSet.from_json((await stub.GetJwks(pb.GetJwksRequest())).jwks_json)
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in jwks.keys if k.key_id == kid)
    return jwt.decode(
        token,
        key,
        algorithms=["ES256", "RS256"],
        audience=cfg.security.audience,
        issuer=cfg.security.issuer,
        options={"require": ["exp", "iat", "nbf", "sub"]},
    )


# ---- contract and config ------------------------------------------------------------
def test_every_rpc_is_implemented_with_a_policy() -> None:
    methods = pb.DESCRIPTOR.services_by_name["Security"].methods
    names = {m.name for m in methods}
    assert {"RotateApiKey", "GetApiKeySecret", "RotateDataKey", "Rewrap", "AppendAuditBatch"} <= names
    for m in methods:
        policy = m.GetOptions().Extensions[options_pb2.method_policy]
        assert policy.implemented and (policy.scope or policy.anonymous), m.name
    secret = (
        pb.GetApiKeySecretResponse.DESCRIPTOR.fields_by_name["secret"].GetOptions().Extensions[options_pb2.field_policy]
    )
    assert secret.sensitivity == options_pb2.SENSITIVITY_SECRET
    get_secret = pb.DESCRIPTOR.services_by_name["Security"].methods_by_name["GetApiKeySecret"]
    assert get_secret.GetOptions().Extensions[options_pb2.method_policy].scope == "security:internal"


def test_config_without_security_section_gets_defaults(tmp_path: Path) -> None:
    p = tmp_path / "old.yaml"
    p.write_text("inference:\n  chat_ttl_seconds: 5\n")
    s = load_config(p, env={}).security
    assert (s.server.port, s.server.metrics_port, s.issuer, s.audience, s.token_ttl_seconds, s.signing_algorithm) == (
        50062,
        9462,
        "llmesh",
        "llmesh-gateway",
        900,
        "ES256",
    )


# ---- API keys ----------------------------------------------------------------------
async def test_api_key_create_list_rotate_revoke(sec: Running) -> None:
    created = await new_key(sec.stub, owner="bob", tenant="acme", ttl_days=30)
    k = created.key
    assert re.fullmatch(r"lk_[0-9a-f]{32}", k.key_id) and len(created.secret) >= 43
    assert (k.owner, k.tenant, list(k.scopes), list(k.roles), k.revoked) == (
        "bob",
        "acme",
        ["embedding:embed", "inference:generate"],
        ["user"],
        False,
    )
    assert 29.9 * 86400 < k.expires_at.seconds - k.created_at.seconds <= 30 * 86400

    listed = await sec.stub.ListApiKeys(pb.ListApiKeysRequest(owner="bob"))
    assert [x.key_id for x in listed.keys] == [k.key_id]
    assert created.secret.encode() not in listed.SerializeToString()
    assert "secret" not in pb.ApiKey.DESCRIPTOR.fields_by_name
    assert not (await sec.stub.ListApiKeys(pb.ListApiKeysRequest(owner="bob", tenant="other"))).keys

    got = await sec.stub.GetApiKeySecret(pb.GetApiKeySecretRequest(key_id=k.key_id))
    assert got.secret == created.secret and got.key.key_id == k.key_id

    rotated = await sec.stub.RotateApiKey(pb.RotateApiKeyRequest(key_id=k.key_id))
    assert rotated.key.key_id == k.key_id and rotated.secret != created.secret and rotated.key.HasField("rotated_at")
    await expect(
        Code.UNAUTHENTICATED, sec.stub.IssueToken(pb.IssueTokenRequest(key_id=k.key_id, secret=created.secret))
    )
    assert (await sec.stub.IssueToken(pb.IssueTokenRequest(key_id=k.key_id, secret=rotated.secret))).token
    assert (await sec.stub.GetApiKeySecret(pb.GetApiKeySecretRequest(key_id=k.key_id))).secret == rotated.secret

    revoked = await sec.stub.RevokeApiKey(pb.RevokeApiKeyRequest(key_id=k.key_id))
    assert revoked.revoked and revoked.HasField("revoked_at")
    again = await sec.stub.RevokeApiKey(pb.RevokeApiKeyRequest(key_id=k.key_id))
    assert again.revoked_at == revoked.revoked_at  # idempotent
    assert (await sec.stub.ListApiKeys(pb.ListApiKeysRequest(owner="bob"))).keys[0].revoked
    await expect(Code.FAILED_PRECONDITION, sec.stub.RotateApiKey(pb.RotateApiKeyRequest(key_id=k.key_id)))
    await expect(Code.FAILED_PRECONDITION, sec.stub.GetApiKeySecret(pb.GetApiKeySecretRequest(key_id=k.key_id)))


async def test_secret_is_stored_encrypted(sec: Running) -> None:
    created = await new_key(sec.stub, owner="carol")
    with sqlite3.connect(sec.db_path) as conn:
        ct = conn.execute("SELECT secret_ct FROM api_keys WHERE key_id = ?", (created.key.key_id,)).fetchone()[0]
        dump = "\n".join(conn.iterdump())
    assert created.secret.encode() not in ct and created.secret not in dump
    assert ct[:3] == b"\x02k1" or ct[1:2] == b"k"


# ---- tokens -----------------------------------------------------------------------
async def test_issue_token_claims_and_errors(sec: Running) -> None:
    created = await new_key(sec.stub, owner="dave", tenant="acme")
    kid = created.key.key_id
    resp = await sec.stub.IssueToken(pb.IssueTokenRequest(key_id=kid, secret=created.secret, ttl_seconds=60))
    claims = await verify(sec.stub, resp.token, sec.cfg)
    assert claims["sub"] == "dave" and claims["tenant"] == "acme" and claims["roles"] == ["user"]
    assert claims["scopes"] == ["embedding:embed", "inference:generate"] and claims["key_id"] == kid
    assert claims["exp"] - claims["iat"] == 60 and claims["nbf"] == claims["iat"]
    assert claims["exp"] == resp.expires_at.seconds and jwt.get_unverified_header(resp.token)["kid"] == resp.kid

    narrowed = await sec.stub.IssueToken(
        pb.IssueTokenRequest(key_id=kid, secret=created.secret, scopes=["inference:generate"], ttl_seconds=10**6)
    )
    c2 = await verify(sec.stub, narrowed.token, sec.cfg)
    assert c2["scopes"] == ["inference:generate"] and c2["exp"] - c2["iat"] == 600  # capped at the configured max

    await expect(
        Code.PERMISSION_DENIED,
        sec.stub.IssueToken(
            pb.IssueTokenRequest(key_id=kid, secret=created.secret, scopes=["inference:generate", "security:admin"])
        ),
    )
    await expect(
        Code.UNAUTHENTICATED, sec.stub.IssueToken(pb.IssueTokenRequest(key_id=kid, secret=created.secret + "x"))
    )
    await expect(
        Code.UNAUTHENTICATED, sec.stub.IssueToken(pb.IssueTokenRequest(key_id="lk_" + "0" * 32, secret="whatever"))
    )
    await sec.stub.RevokeApiKey(pb.RevokeApiKeyRequest(key_id=kid))
    await expect(Code.FAILED_PRECONDITION, sec.stub.IssueToken(pb.IssueTokenRequest(key_id=kid, secret=created.secret)))


async def test_hs256_development_mode(tmp_path: Path) -> None:
    """signing_algorithm HS256: tokens the gateway's verifier accepts with the shared
    secret file (and only when it allows HS256); the JWKS never publishes a symmetric key."""
    from llmesh.runtime.identity import HS256_SECRET, load_secret
    from llmesh.services.gateway.authn import JwtVerifier

    with pytest.raises(ConfigError, match="jwt_algorithms"):
        mesh_config(tmp_path, signing_algorithm="HS256")
    async with running(tmp_path, signing_algorithm="HS256", gateway={"jwt_algorithms": ["HS256"]}) as r:
        created = await new_key(r.stub, owner="hal", tenant="acme")
        resp = await r.stub.IssueToken(pb.IssueTokenRequest(key_id=created.key.key_id, secret=created.secret))
        assert jwt.get_unverified_header(resp.token)["alg"] == "HS256" and resp.kid == ""
        assert all(k["kty"] != "oct" for k in json.loads((await r.stub.GetJwks(pb.GetJwksRequest())).jwks_json)["keys"])
        secret = load_secret(r.cfg.home, HS256_SECRET)
        assert (r.cfg.home / "security" / HS256_SECRET).stat().st_mode & 0o777 == 0o600
        dev = JwtVerifier(r.cfg.gateway.issuer, r.cfg.gateway.audience, hs256_secret=secret, allowed_algs=["HS256"])
        principal = await dev.verify(resp.token)
        assert principal.subject == "hal" and principal.tenant == "acme" and principal.api_key_id == created.key.key_id
        production = JwtVerifier(r.cfg.gateway.issuer, r.cfg.gateway.audience)  # RS256/ES256 only
        with pytest.raises(Unauthenticated, match="not allowed"):
            await production.verify(resp.token)


async def test_wildcard_scope_covers_its_prefix(sec: Running) -> None:
    created = await new_key(sec.stub, owner="erin", scopes=("inference:*",))
    r = await sec.stub.IssueToken(
        pb.IssueTokenRequest(key_id=created.key.key_id, secret=created.secret, scopes=["inference:generate"])
    )
    assert list(r.scopes) == ["inference:generate"]
    await expect(
        Code.PERMISSION_DENIED,
        sec.stub.IssueToken(
            pb.IssueTokenRequest(key_id=created.key.key_id, secret=created.secret, scopes=["embedding:embed"])
        ),
    )


async def test_signing_key_rotation_keeps_old_tokens_verifiable(sec: Running) -> None:
    created = await new_key(sec.stub, owner="frank")
    req = pb.IssueTokenRequest(key_id=created.key.key_id, secret=created.secret)
    old = await sec.stub.IssueToken(req)
    rot = await sec.stub.RotateSigningKey(pb.RotateSigningKeyRequest())
    assert rot.previous_kid == old.kid and rot.kid != old.kid and rot.algorithm == "ES256"
    assert rot.previous_retires_at.seconds >= int(time.time()) + 600
    new = await sec.stub.IssueToken(req)
    assert new.kid == rot.kid
    kids = {k["kid"] for k in json.loads((await sec.stub.GetJwks(pb.GetJwksRequest())).jwks_json)["keys"]}
    assert {old.kid, new.kid} <= kids
    assert (await verify(sec.stub, old.token, sec.cfg))["sub"] == "frank"
    assert (await verify(sec.stub, new.token, sec.cfg))["sub"] == "frank"

    rsa = await sec.stub.RotateSigningKey(pb.RotateSigningKeyRequest(algorithm="RS256"))
    r = await sec.stub.IssueToken(req)
    assert r.kid == rsa.kid and jwt.get_unverified_header(r.token)["alg"] == "RS256"
    assert (await verify(sec.stub, r.token, sec.cfg))["sub"] == "frank"
    jwks = json.loads((await sec.stub.GetJwks(pb.GetJwksRequest())).jwks_json)
    for k in jwks["keys"]:
        assert k["use"] == "sig" and k["alg"] in ("ES256", "RS256") and "d" not in k


async def test_retired_signing_keys_leave_the_jwks(tmp_path: Path) -> None:
    async with running(tmp_path, token_ttl_seconds=1) as r:
        first = json.loads((await r.stub.GetJwks(pb.GetJwksRequest())).jwks_json)["keys"][0]["kid"]
        await r.stub.RotateSigningKey(pb.RotateSigningKeyRequest())
        servicer_jwks = json.loads((await r.stub.GetJwks(pb.GetJwksRequest())).jwks_json)
        assert first in {k["kid"] for k in servicer_jwks["keys"]}
    # Retirement is ttl + 60 s of clock skew: check it through the issuer's clock argument.
    from llmesh.services.security.servicer import SecurityServicer

    s = SecurityServicer(mesh_config(tmp_path, token_ttl_seconds=1).security, tmp_path / "security")
    await s.start()
    try:
        assert first in {k["kid"] for k in s.tokens.jwks()["keys"]}
        assert first not in {k["kid"] for k in s.tokens.jwks(now=time.time() + 62)["keys"]}
        assert len(s.tokens.jwks(now=time.time() + 62)["keys"]) == 1
    finally:
        await s.close()


# ---- encryption ---------------------------------------------------------------------
async def test_encrypt_decrypt_rotate_rewrap(sec: Running) -> None:
    ct = await sec.stub.Encrypt(pb.EncryptRequest(plaintext=b"hello \xe4\xbd\xa0", associated_data=b"doc:1"))
    assert (
        ct.ciphertext[0] == len(ct.key_version) and ct.ciphertext[1 : 1 + ct.ciphertext[0]].decode() == ct.key_version
    )
    assert (
        await sec.stub.Decrypt(pb.DecryptRequest(ciphertext=ct.ciphertext, associated_data=b"doc:1"))
    ).plaintext == b"hello \xe4\xbd\xa0"
    await expect(
        Code.INVALID_ARGUMENT, sec.stub.Decrypt(pb.DecryptRequest(ciphertext=ct.ciphertext, associated_data=b"doc:2"))
    )
    await expect(Code.INVALID_ARGUMENT, sec.stub.Decrypt(pb.DecryptRequest(ciphertext=ct.ciphertext)))
    tampered = bytearray(ct.ciphertext)
    tampered[-1] ^= 1
    await expect(
        Code.INVALID_ARGUMENT, sec.stub.Decrypt(pb.DecryptRequest(ciphertext=bytes(tampered), associated_data=b"doc:1"))
    )
    empty = await sec.stub.Encrypt(pb.EncryptRequest(plaintext=b""))
    assert (await sec.stub.Decrypt(pb.DecryptRequest(ciphertext=empty.ciphertext))).plaintext == b""

    key = await new_key(sec.stub, owner="gina")
    rot = await sec.stub.RotateDataKey(pb.RotateDataKeyRequest())
    assert rot.key_version != ct.key_version and rot.rewrapped >= 2  # stored API key secrets + signing keys
    old = await sec.stub.Decrypt(pb.DecryptRequest(ciphertext=ct.ciphertext, associated_data=b"doc:1"))
    assert old.plaintext == b"hello \xe4\xbd\xa0" and old.key_version == ct.key_version
    assert (await sec.stub.Encrypt(pb.EncryptRequest(plaintext=b"x"))).key_version == rot.key_version

    rw = await sec.stub.Rewrap(pb.RewrapRequest(ciphertext=ct.ciphertext, associated_data=b"doc:1"))
    assert (rw.previous_key_version, rw.key_version) == (ct.key_version, rot.key_version)
    back = await sec.stub.Decrypt(pb.DecryptRequest(ciphertext=rw.ciphertext, associated_data=b"doc:1"))
    assert back.plaintext == b"hello \xe4\xbd\xa0" and back.key_version == rot.key_version
    await expect(
        Code.INVALID_ARGUMENT, sec.stub.Rewrap(pb.RewrapRequest(ciphertext=ct.ciphertext, associated_data=b"nope"))
    )

    # The service's own secrets were re-wrapped and still work.
    assert (await sec.stub.IssueToken(pb.IssueTokenRequest(key_id=key.key.key_id, secret=key.secret))).token
    with sqlite3.connect(sec.db_path) as conn:
        stored = conn.execute("SELECT secret_ct FROM api_keys WHERE key_id = ?", (key.key.key_id,)).fetchone()[0]
    assert stored[1 : 1 + stored[0]].decode() == rot.key_version


# ---- audit --------------------------------------------------------------------------
async def _append(stub: pb_grpc.SecurityAsyncStub, n: int) -> list[pb.AuditRecord]:
    out = [
        await stub.AppendAudit(
            pb.AppendAuditRequest(
                actor=f"user{i % 2}",
                action="inference.generate" if i % 3 else "keys.create",
                resource=f"r{i}",
                outcome="ok",
                attributes={"i": str(i), "ip": "10.0.0.1"},
            )
        )
        for i in range(n)
    ]
    return out


async def test_audit_chain_detects_edit_delete_and_reorder(tmp_path: Path) -> None:
    async with running(tmp_path) as r:
        recs = await _append(r.stub, 5)
        batch = await r.stub.AppendAuditBatch(
            pb.AppendAuditBatchRequest(
                records=[
                    pb.AppendAuditRequest(
                        actor="gateway", action="http.request", outcome="ok", attributes={"n": str(i)}
                    )
                    for i in range(3)
                ]
            )
        )
        recs += list(batch.records)
        assert [x.sequence for x in recs] == list(range(1, 9))
        assert recs[0].prev_hash == "0" * 64
        assert all(b.prev_hash == a.hash for a, b in zip(recs, recs[1:], strict=False))
        ok = await r.stub.VerifyAuditChain(pb.VerifyAuditChainRequest())
        assert (ok.intact, ok.records, ok.first_bad_sequence) == (True, 8, 0)

        q = await r.stub.QueryAudit(pb.QueryAuditRequest(actor="user1"))
        assert [x.sequence for x in q.records] == [2, 4]
        q = await r.stub.QueryAudit(pb.QueryAuditRequest(action="keys.create"))
        assert [x.sequence for x in q.records] == [1, 4]
        q = await r.stub.QueryAudit(pb.QueryAuditRequest(limit=3, after_sequence=2))
        assert [x.sequence for x in q.records] == [3, 4, 5] and q.records[0].attributes["i"] == "2"
        q = await r.stub.QueryAudit(pb.QueryAuditRequest(since=recs[6].time))
        assert [x.sequence for x in q.records] == [7, 8]

        db = sqlite3.connect(r.db_path, isolation_level=None)
        try:
            # edit a field
            db.execute("UPDATE audit SET outcome = 'denied' WHERE sequence = 4")
            v = await r.stub.VerifyAuditChain(pb.VerifyAuditChainRequest())
            assert (v.intact, v.first_bad_sequence) == (False, 4) and v.detail
            db.execute("UPDATE audit SET outcome = 'ok' WHERE sequence = 4")
            assert (await r.stub.VerifyAuditChain(pb.VerifyAuditChainRequest())).intact
            # edit the attributes JSON
            db.execute('UPDATE audit SET attributes = \'{"i":"9","ip":"10.0.0.1"}\' WHERE sequence = 3')
            assert (await r.stub.VerifyAuditChain(pb.VerifyAuditChainRequest())).first_bad_sequence == 3
            db.execute('UPDATE audit SET attributes = \'{"i":"2","ip":"10.0.0.1"}\' WHERE sequence = 3')
            # reorder: swap the contents of records 5 and 6
            rows = {
                s: db.execute(
                    "SELECT time_us, actor, action, resource, outcome, attributes, prev_hash, hash FROM audit "
                    "WHERE sequence = ?",
                    (s,),
                ).fetchone()
                for s in (5, 6)
            }
            for s, other in ((5, 6), (6, 5)):
                db.execute(
                    "UPDATE audit SET time_us=?, actor=?, action=?, resource=?, outcome=?, attributes=?, prev_hash=?, hash=? "
                    "WHERE sequence = ?",
                    (*rows[other], s),
                )
            assert (await r.stub.VerifyAuditChain(pb.VerifyAuditChainRequest())).first_bad_sequence == 5
            for s in (5, 6):
                db.execute(
                    "UPDATE audit SET time_us=?, actor=?, action=?, resource=?, outcome=?, attributes=?, prev_hash=?, hash=? "
                    "WHERE sequence = ?",
                    (*rows[s], s),
                )
            assert (await r.stub.VerifyAuditChain(pb.VerifyAuditChainRequest())).intact
            # delete a row in the middle, then the tail
            db.execute("DELETE FROM audit WHERE sequence = 6")
            v = await r.stub.VerifyAuditChain(pb.VerifyAuditChainRequest())
            assert (v.intact, v.records, v.first_bad_sequence) == (False, 7, 6)
            db.execute("DELETE FROM audit WHERE sequence >= 6")
            v = await r.stub.VerifyAuditChain(pb.VerifyAuditChainRequest())
            assert (v.intact, v.first_bad_sequence) == (False, 6) and "truncated" in v.detail
        finally:
            db.close()


# ---- masking ------------------------------------------------------------------------
async def test_masking_rules(sec: Running) -> None:
    rules = await sec.stub.GetMaskingRules(pb.GetMaskingRulesRequest())
    by = {r.name: r for r in rules.rules}
    assert list(by) == ["cn_mobile", "cn_id", "bank_card", "email", "ipv4", "ipv6"] and rules.version
    assert {n: (r.operator, r.reversible) for n, r in by.items()} == {
        "cn_mobile": ("pseudonymize", True),
        "cn_id": ("pseudonymize", True),
        "bank_card": ("pseudonymize", True),
        "email": ("pseudonymize", True),
        "ipv4": ("mask", False),
        "ipv6": ("mask", False),
    }
    assert (by["cn_id"].validator, by["bank_card"].validator, by["cn_mobile"].label) == (
        "cn_id_checksum",
        "luhn",
        "PHONE",
    )
    samples = {
        "cn_mobile": "电话+86 138-1234-5678谢谢",
        "cn_id": "身份证11010519491231002X",
        "bank_card": "卡号 6222 0212 3456 7890",
        "email": "mail a.b+c@example.com.",
        "ipv4": "from 192.168.1.20.",
        "ipv6": "addr 2001:db8::1 ok",
    }
    for name, text in samples.items():
        assert re.search(by[name].pattern, text), name
    assert not re.search(by["cn_mobile"].pattern, "138123456789")
    # The pattern proposes, the named validator decides (what the gateway enforces too).
    assert re.search(by["ipv4"].pattern, "999.1.1.1") and not _published_finds(by["ipv4"], "999.1.1.1")


def _published_finds(rule: pb.MaskingRule, text: str) -> list[tuple[int, int]]:
    """The spans a published rule finds in ``text``: its pattern's candidates that its
    named validator accepts (the validator names are the published contract)."""
    validate = pii.VALIDATORS[rule.validator]
    return [span for m in re.finditer(rule.pattern, text) if (span := validate(m)) is not None]


async def test_published_rules_are_the_enforced_rules(sec: Running) -> None:
    """What GetMaskingRules publishes is what the gateway's masker enforces: the same
    entities, operators and placeholder labels, and on every detection sample the
    published patterns + validators find exactly what the masker finds (an overlapped
    candidate loses to a longer or equal finding, as in the masker)."""
    published = await sec.stub.GetMaskingRules(pb.GetMaskingRulesRequest())
    rules = {r.name: r for r in published.rules}
    assert published.version == pii.VERSION
    assert {n: r.operator for n, r in rules.items()} == {k: v.value for k, v in DEFAULT_OPERATORS.items()}
    masker = Masker(hash_key=b"k")
    for entity, text, value in POSITIVE:
        masked, _ = masker.mask(text, Vault())
        assert (f"<{rules[entity].label}_1>" in masked) == rules[entity].reversible, (entity, masked)
        assert value not in masked
    for text in [t for _, t, _ in POSITIVE] + NEGATIVE:
        enforced = {(f.entity, (f.start, f.end)) for f in masker.find(text)}
        candidates = {(n, span) for n, r in rules.items() for span in _published_finds(r, text)}
        assert enforced <= candidates, text
        for _, (a, b) in candidates - enforced:  # each one lost to an overlapping, no shorter finding
            assert any(s < b and a < e and e - s >= b - a for _, (s, e) in enforced), text


# ---- bad input ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "request_", "code"),
    [
        ("CreateApiKey", pb.CreateApiKeyRequest(scopes=["a:b"]), Code.INVALID_ARGUMENT),
        ("CreateApiKey", pb.CreateApiKeyRequest(owner="x y", scopes=["a:b"]), Code.INVALID_ARGUMENT),
        ("CreateApiKey", pb.CreateApiKeyRequest(owner="x"), Code.INVALID_ARGUMENT),
        ("CreateApiKey", pb.CreateApiKeyRequest(owner="x", scopes=["Bad Scope"]), Code.INVALID_ARGUMENT),
        ("CreateApiKey", pb.CreateApiKeyRequest(owner="x", scopes=["a:b"], ttl_days=100000), Code.INVALID_ARGUMENT),
        ("CreateApiKey", pb.CreateApiKeyRequest(owner="x", scopes=["a:b"], tenant="t/1"), Code.INVALID_ARGUMENT),
        ("ListApiKeys", pb.ListApiKeysRequest(owner="bad owner"), Code.INVALID_ARGUMENT),
        ("RevokeApiKey", pb.RevokeApiKeyRequest(), Code.INVALID_ARGUMENT),
        ("RevokeApiKey", pb.RevokeApiKeyRequest(key_id="nope"), Code.INVALID_ARGUMENT),
        ("RevokeApiKey", pb.RevokeApiKeyRequest(key_id="lk_" + "a" * 32), Code.NOT_FOUND),
        ("RotateApiKey", pb.RotateApiKeyRequest(key_id="lk_" + "a" * 32), Code.NOT_FOUND),
        ("RotateApiKey", pb.RotateApiKeyRequest(), Code.INVALID_ARGUMENT),
        ("GetApiKeySecret", pb.GetApiKeySecretRequest(key_id="lk_" + "b" * 32), Code.NOT_FOUND),
        ("GetApiKeySecret", pb.GetApiKeySecretRequest(key_id="lk_x"), Code.INVALID_ARGUMENT),
        ("IssueToken", pb.IssueTokenRequest(secret="s"), Code.INVALID_ARGUMENT),
        ("IssueToken", pb.IssueTokenRequest(key_id="lk_" + "a" * 32), Code.INVALID_ARGUMENT),
        ("RotateSigningKey", pb.RotateSigningKeyRequest(algorithm="HS256"), Code.INVALID_ARGUMENT),
        ("Encrypt", pb.EncryptRequest(plaintext=b"x" * (1024 * 1024 + 1)), Code.INVALID_ARGUMENT),
        ("Encrypt", pb.EncryptRequest(plaintext=b"x", associated_data=b"a" * (64 * 1024 + 1)), Code.INVALID_ARGUMENT),
        ("Decrypt", pb.DecryptRequest(), Code.INVALID_ARGUMENT),
        ("Decrypt", pb.DecryptRequest(ciphertext=b"\x02k1short"), Code.INVALID_ARGUMENT),
        ("Decrypt", pb.DecryptRequest(ciphertext=b"\x03k99" + b"\x00" * 40), Code.INVALID_ARGUMENT),
        ("Decrypt", pb.DecryptRequest(ciphertext=b"\xff" * 50), Code.INVALID_ARGUMENT),
        ("Rewrap", pb.RewrapRequest(), Code.INVALID_ARGUMENT),
        ("AppendAudit", pb.AppendAuditRequest(action="a"), Code.INVALID_ARGUMENT),
        ("AppendAudit", pb.AppendAuditRequest(actor="a"), Code.INVALID_ARGUMENT),
        ("AppendAudit", pb.AppendAuditRequest(actor="a", action="b", resource="r" * 2000), Code.INVALID_ARGUMENT),
        (
            "AppendAudit",
            pb.AppendAuditRequest(actor="a", action="b", attributes={"k": "v" * 5000}),
            Code.INVALID_ARGUMENT,
        ),
        ("AppendAuditBatch", pb.AppendAuditBatchRequest(), Code.INVALID_ARGUMENT),
        (
            "AppendAuditBatch",
            pb.AppendAuditBatchRequest(
                records=[pb.AppendAuditRequest(actor="a", action="b"), pb.AppendAuditRequest(actor="a")]
            ),
            Code.INVALID_ARGUMENT,
        ),
        ("QueryAudit", pb.QueryAuditRequest(limit=5000), Code.INVALID_ARGUMENT),
    ],
)
async def test_bad_input(sec: Running, method: str, request_: object, code: grpc.StatusCode) -> None:
    err = await expect(code, getattr(sec.stub, method)(request_))
    assert err.code() != Code.INTERNAL


async def test_bad_batch_appends_nothing_and_names_the_record(sec: Running) -> None:
    before = (await sec.stub.VerifyAuditChain(pb.VerifyAuditChainRequest())).records
    err = await expect(
        Code.INVALID_ARGUMENT,
        sec.stub.AppendAuditBatch(
            pb.AppendAuditBatchRequest(
                records=[pb.AppendAuditRequest(actor="a", action="b"), pb.AppendAuditRequest(actor="a")]
            )
        ),
    )
    assert "records[1].action" in (err.details() or "")
    assert (await sec.stub.VerifyAuditChain(pb.VerifyAuditChainRequest())).records == before


async def test_calls_before_warm_up_are_unavailable(tmp_path: Path) -> None:
    async with running(tmp_path, warm=False) as r:
        await expect(Code.UNAVAILABLE, r.stub.GetJwks(pb.GetJwksRequest()))


# ---- persistence --------------------------------------------------------------------
async def test_state_survives_a_restart(tmp_path: Path) -> None:
    async with running(tmp_path) as r:
        key = await new_key(r.stub, owner="henry")
        token = (await r.stub.IssueToken(pb.IssueTokenRequest(key_id=key.key.key_id, secret=key.secret))).token
        ct = await r.stub.Encrypt(pb.EncryptRequest(plaintext=b"persist", associated_data=b"ad"))
        await r.stub.RotateDataKey(pb.RotateDataKeyRequest())
        await _append(r.stub, 3)
        jwks_before = (await r.stub.GetJwks(pb.GetJwksRequest())).jwks_json
    master = tmp_path / "security" / "master.key"
    assert stat.S_IMODE(master.stat().st_mode) == 0o600 and master.stat().st_size == 32
    async with running(tmp_path) as r:
        assert [k.key_id for k in (await r.stub.ListApiKeys(pb.ListApiKeysRequest(owner="henry"))).keys] == [
            key.key.key_id
        ]
        assert (await r.stub.GetJwks(pb.GetJwksRequest())).jwks_json == jwks_before
        assert (await verify(r.stub, token, r.cfg))["sub"] == "henry"
        assert (await r.stub.IssueToken(pb.IssueTokenRequest(key_id=key.key.key_id, secret=key.secret))).token
        assert (
            await r.stub.Decrypt(pb.DecryptRequest(ciphertext=ct.ciphertext, associated_data=b"ad"))
        ).plaintext == b"persist"
        assert (await r.stub.Encrypt(pb.EncryptRequest(plaintext=b"x"))).key_version == "k2"
        rec = await r.stub.AppendAudit(pb.AppendAuditRequest(actor="a", action="b"))
        assert rec.sequence == 4
        v = await r.stub.VerifyAuditChain(pb.VerifyAuditChainRequest())
        assert v.intact and v.records == 4


async def test_refuses_a_foreign_master_key(tmp_path: Path) -> None:
    async with running(tmp_path):
        pass
    (tmp_path / "security" / "master.key").write_bytes(os.urandom(32))
    from llmesh.services.security.servicer import SecurityServicer

    s = SecurityServicer(mesh_config(tmp_path).security, tmp_path / "security")
    with pytest.raises(RuntimeError, match="master key"):
        await s.start()
    await s.close()
    (tmp_path / "security" / "master.key").unlink()
    with pytest.raises(RuntimeError, match="missing"):
        await s.start()
    await s.close()


# ---- the real entry point -----------------------------------------------------------
async def test_module_entry_point_serves_health(tmp_path: Path) -> None:
    import asyncio

    (port,) = free_ports(1)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LLMESH")},
        "LLMESH_HOME": str(tmp_path),
        "LLMESH__SECURITY__SERVER__PORT": str(port),
        "LLMESH__SECURITY__SERVER__METRICS_PORT": "0",
        "OTEL_TRACES_EXPORTER": "none",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmesh.services.security"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        status = None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for _ in range(150):
                try:
                    status = (
                        await health.Check(
                            health_pb2.HealthCheckRequest(service="llmesh.security.v1.Security"), timeout=1
                        )
                    ).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    pass
                assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
                await asyncio.sleep(0.1)
            assert status == health_pb2.HealthCheckResponse.SERVING
            from llmesh.client import OPERATOR
            from llmesh.runtime.identity import IDENTITY_KEY, InternalIdentity, load_secret

            with pytest.raises(grpc.aio.AioRpcError) as refused:  # the service requires the gateway's identity
                await pb_grpc.SecurityStub(ch).GetJwks(pb.GetJwksRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            md = ((IDENTITY_KEY, InternalIdentity(load_secret(tmp_path)).mint(OPERATOR)),)
            jwks = await pb_grpc.SecurityStub(ch).GetJwks(pb.GetJwksRequest(), timeout=5, metadata=md)
            assert json.loads(jwks.jwks_json)["keys"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert (tmp_path / "security" / "security.db").is_file()
