"""The compliance report's own logic, without a mesh: address classification, policy and
field counting from the real descriptors, status rules on real config objects, and the
at-rest checks against a real security-service database in a temporary LLMESH_HOME."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from llmesh import compliance
from llmesh.cli import app
from llmesh.compliance.access_control import token_signing_findings
from llmesh.compliance.addresses import display_url, host_of, is_loopback
from llmesh.compliance.at_rest import security_store_findings
from llmesh.compliance.audit_log import audit_spool_finding
from llmesh.compliance.contracts import INFERENCE, SECURITY, count_policies, sensitive_fields
from llmesh.compliance.findings import make_check
from llmesh.compliance.in_transit import encryption_in_transit, transit_config_findings
from llmesh.compliance.retention import retention
from llmesh.config import MeshConfig, load_config
from llmesh.pb.security.v1 import security_pb2 as spb
from llmesh.services.gateway.audit import Spool
from llmesh.services.gateway.routes import service_descriptor
from llmesh.services.security.servicer import SecurityServicer
from tests.support.sandbox import write_config


def config(home: Path, overrides: dict[str, dict[str, Any]] | None = None) -> MeshConfig:
    home.mkdir(parents=True, exist_ok=True)
    return load_config(write_config(home, overrides), env={})


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("::ffff:127.0.0.1", True),
        ("::ffff:10.0.0.7", False),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.7", False),
        ("db.example.com", False),
        ("", False),
    ],
)
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


@pytest.mark.parametrize(
    ("address", "host"),
    [
        ("127.0.0.1:50061", "127.0.0.1"),
        ("[::1]:50051", "::1"),
        ("redis://127.0.0.1:6390/0", "127.0.0.1"),
        ("redis://:pw@10.1.2.3:6379/1", "10.1.2.3"),
        ("unix:/run/llmesh.sock", "localhost"),
        ("db.internal:6379", "db.internal"),
    ],
)
def test_host_of(address: str, host: str) -> None:
    assert host_of(address) == host


def test_display_url_drops_credentials() -> None:
    assert display_url("redis://user:s3cret@10.1.2.3:6379/0") == "redis://10.1.2.3:6379/0"
    assert display_url("redis://127.0.0.1:6390/0") == "redis://127.0.0.1:6390/0"


def test_policy_counts_come_from_the_descriptors() -> None:
    sec = count_policies([service_descriptor(SECURITY)])
    assert sec.anonymous == ["Security/IssueToken", "Security/GetJwks"]
    assert sec.scoped == sec.total - 2 and sec.unguarded == [] and sec.implemented == sec.total
    inf = count_policies([service_descriptor(INFERENCE)])
    assert inf.anonymous == [] and inf.scoped == inf.total == len(service_descriptor(INFERENCE).methods)


def test_sensitive_fields_come_from_field_policy() -> None:
    fields = sensitive_fields([service_descriptor(INFERENCE), service_descriptor(SECURITY)])
    assert "llmesh.inference.v1.GenerateRequest.prompt" in fields["pii"]
    assert "llmesh.common.v1.ChatMessage.content" in fields["pii"]  # reached through a nested message
    assert "llmesh.security.v1.CreateApiKeyResponse.secret" in fields["secret"]
    assert not set(fields["pii"]) & set(fields["secret"])


def test_status_is_the_worst_finding_and_non_passing_lines_are_tagged() -> None:
    assert make_check("x", "X", []).status == "pass"
    c = make_check("x", "X", [("pass", "a"), ("warn", "b")])
    assert (c.status, c.evidence) == ("warn", ["a", "WARN: b"])
    assert make_check("x", "X", [("warn", "b"), ("fail", "c"), ("pass", "a")]).status == "fail"


def test_loopback_config_passes_in_transit(tmp_path: Path) -> None:
    findings = transit_config_findings(config(tmp_path))
    assert {s for s, _ in findings} == {"pass"}
    assert any("TLS not configured" in text for _, text in findings)


def test_non_loopback_gateway_fails_in_transit(tmp_path: Path) -> None:
    check = encryption_in_transit(config(tmp_path, {"gateway": {"server": {"host": "0.0.0.0", "port": 50051}}}))
    assert check.status == "fail"
    assert any(e.startswith("FAIL: gateway.server.host=0.0.0.0") for e in check.evidence)


def test_remote_peer_fails_in_transit_without_printing_its_password(tmp_path: Path) -> None:
    peers = {"triton": "127.0.0.1:8101", "redis": "redis://:hunter2@10.1.2.3:6379/0"}
    check = encryption_in_transit(config(tmp_path, {"inference": {"peers": peers}}))
    assert check.status == "fail"
    assert any("inference.peers.redis=redis://10.1.2.3:6379/0" in e for e in check.evidence)
    assert "hunter2" not in json.dumps(check.to_dict())


def test_hs256_development_mode_is_reported(tmp_path: Path) -> None:
    assert [s for s, _ in token_signing_findings(config(tmp_path / "a"))] == ["pass"]
    cfg = config(tmp_path / "b", {"security": {"signing_algorithm": "HS256"}, "gateway": {"jwt_algorithms": ["HS256"]}})
    (warn, text), (missing, _) = token_signing_findings(cfg)
    assert (warn, missing) == ("warn", "fail") and "HS256 development mode" in text


def test_spooled_audit_records_are_reported(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assert audit_spool_finding(cfg)[0] == "pass"
    spool_dir = cfg.home / "gateway" / "audit-spool"

    async def spool_one() -> None:  # a gateway that spooled a record and never delivered it
        spool = Spool(spool_dir, fsync=False)
        spool.claim()
        await spool.append(spb.AppendAuditBatchRequest(records=[spb.AppendAuditRequest(actor="a")]).SerializeToString())
        await spool.close()

    asyncio.run(spool_one())
    status, text = audit_spool_finding(cfg)
    assert status == "warn" and text.startswith(f"1 audit record(s) in {spool_dir} are not yet in the hash chain")


def test_retention_warns_about_the_audit_log_and_reads_the_chat_ttl(tmp_path: Path) -> None:
    check = retention(config(tmp_path, {"inference": {"chat_ttl_seconds": 0}}))
    assert check.status == "warn"
    assert any("audit log kept indefinitely" in e for e in check.evidence)
    assert any(e.startswith("WARN: inference.chat_ttl_seconds=0") for e in check.evidence)


# ---- encryption at rest against a real security database --------------------------------
@pytest.fixture
def security_cfg(tmp_path: Path) -> tuple[MeshConfig, str]:
    """A LLMESH_HOME whose security state the real servicer created, holding one API key."""
    cfg = config(tmp_path)
    servicer = SecurityServicer(cfg.security, cfg.home / "security")

    async def populate() -> str:
        await servicer.start()
        try:
            _, secret = await servicer.db.call(
                lambda c: servicer.api_keys.create_sync(c, "alice", "", ["inference:*"], [], 0)
            )
            return secret
        finally:
            await servicer.close()

    return cfg, asyncio.run(populate())


def _db(cfg: MeshConfig) -> sqlite3.Connection:
    return sqlite3.connect(cfg.home / "security" / "security.db", isolation_level=None)


def test_secrets_at_rest_pass_on_a_fresh_security_state(security_cfg: tuple[MeshConfig, str]) -> None:
    cfg, secret = security_cfg
    findings = security_store_findings(cfg)
    assert {s for s, _ in findings} == {"pass"}, findings
    text = "\n".join(t for _, t in findings)
    assert "api_keys.secret_ct: 1 value(s), all AES-256-GCM keyring ciphertexts (data keys: k1)" in text
    assert "signing_keys.private_ct: 1 value(s)" in text
    assert "mode 0600" in text and secret not in text


def test_readable_master_key_fails(security_cfg: tuple[MeshConfig, str]) -> None:
    cfg, _ = security_cfg
    os.chmod(cfg.home / "security" / "master.key", 0o644)
    assert (
        "fail",
        f"keyring master key {cfg.home / 'security' / 'master.key'} has mode 0644: readable by "
        "group/others (want 0600)",
    ) in security_store_findings(cfg)


def test_plaintext_secret_value_fails_without_being_printed(security_cfg: tuple[MeshConfig, str]) -> None:
    cfg, secret = security_cfg
    with _db(cfg) as db:
        db.execute("UPDATE api_keys SET secret_ct = ?", (secret,))
    bad = [t for s, t in security_store_findings(cfg) if s == "fail"]
    assert len(bad) == 1 and bad[0].startswith("api_keys.secret_ct: 1 of 1 value(s) are not AES-256-GCM")
    assert secret not in bad[0]


def test_plaintext_secret_column_fails(security_cfg: tuple[MeshConfig, str]) -> None:
    cfg, _ = security_cfg
    with _db(cfg) as db:
        db.execute("ALTER TABLE api_keys ADD COLUMN secret TEXT")
    assert (
        "fail",
        "columns that look like secrets but are not keyring-encrypted: api_keys.secret",
    ) in security_store_findings(cfg)


# ---- no mesh running ------------------------------------------------------------------
def test_report_without_a_mesh_fails_with_evidence_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k in [k for k in os.environ if k.startswith("LLMESH")]:
        monkeypatch.delenv(k)
    path = write_config(tmp_path)
    cfg = load_config(path, env={})
    result = CliRunner().invoke(app, ["compliance", "report", "--json", "--config", str(path)])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    checks = {c["id"]: c for c in report["checks"]}
    assert list(checks) == [fn.__name__ for fn in compliance.CHECKS]
    sec = f"127.0.0.1:{cfg.security.server.port}"
    assert checks["audit_log"]["status"] == "fail"
    assert (
        checks["audit_log"]["evidence"][0] == f"FAIL: security service unreachable at {sec}: audit chain not verified"
    )
    assert any(
        f"inference service unreachable at 127.0.0.1:{cfg.inference.server.port}" in e
        for e in checks["access_control"]["evidence"]
    )
    assert report["counts"]["fail"] >= 3
    assert not (tmp_path / "security").exists()  # read-only: no internal.key or database created


def test_security_db_readable_by_others_warns(security_cfg: tuple[MeshConfig, str]) -> None:
    cfg, _ = security_cfg
    folder = cfg.home / "security"
    os.chmod(folder / "security.db", 0o644)
    assert {s for s, _ in security_store_findings(cfg)} == {"pass"}  # private while the folder is 0700
    os.chmod(folder, 0o755)  # what happens when load_secret() creates the folder first
    assert (
        "warn",
        f"{folder} has mode 0755 and security.db has mode 0644: key metadata and audit records are "
        "readable by other users",
    ) in security_store_findings(cfg)


def test_table_shows_evidence_literally(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in [k for k in os.environ if k.startswith("LLMESH")]:
        monkeypatch.delenv(k)
    upstreams = {"llmesh.inference.v1.Inference": "10.0.0.9:50061", "llmesh.security.v1.Security": "127.0.0.1:1"}
    path = write_config(tmp_path, {"gateway": {"upstreams": upstreams}})
    result = CliRunner().invoke(app, ["compliance", "report", "--config", str(path)])
    assert result.exit_code == 1
    assert "upstreams[llmesh" in result.stdout  # brackets are text, not rich markup
