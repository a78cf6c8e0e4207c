"""The tamper-evident audit log: the security service verifies its hash chain over RPC,
and the gateway's own spool reader counts records not yet in the chain."""

from __future__ import annotations

import time
from pathlib import Path

import grpc

from llmesh.client import describe_error, local_channel
from llmesh.compliance.findings import Check, Finding, make_check
from llmesh.compliance.probes import PROBE_TIMEOUT_S, security_dir
from llmesh.config import MeshConfig
from llmesh.launcher.health import DOWN, probe_grpc
from llmesh.pb.security.v1 import security_pb2, security_pb2_grpc
from llmesh.runtime.identity import INTERNAL_SECRET
from llmesh.services.gateway.audit import spool_backlog, stranded_records

# Walking a long audit chain legitimately takes longer than reaching the service.
VERIFY_TIMEOUT_S = 60.0


def audit_chain_finding(cfg: MeshConfig) -> Finding:
    s = cfg.security.server
    target = s.local_address
    health = probe_grpc(s.host, s.port, timeout=PROBE_TIMEOUT_S)
    if health == DOWN:
        return "fail", f"security service unreachable at {target}: audit chain not verified"
    if not (security_dir(cfg) / INTERNAL_SECRET).is_file():  # local_channel would create one
        return "fail", f"{security_dir(cfg) / INTERNAL_SECRET} is missing: cannot call the security service"
    channel = local_channel(target, cfg.home)
    try:
        stub = security_pb2_grpc.SecurityStub(channel)
        r = stub.VerifyAuditChain(security_pb2.VerifyAuditChainRequest(), timeout=VERIFY_TIMEOUT_S)
    except grpc.RpcError as e:
        return "fail", f"VerifyAuditChain at {target} failed: {describe_error(e)}"
    finally:
        channel.close()
    if r.intact:
        return "pass", f"VerifyAuditChain at {target}: ok, hash chain intact over {r.records} records"
    return "fail", f"VerifyAuditChain at {target}: BROKEN at record {r.first_bad_sequence} of {r.records}: {r.detail}"


def audit_spool(cfg: MeshConfig) -> Path:
    return cfg.home / "gateway" / "audit-spool"  # as gateway/__main__.py passes to AuditSink


def audit_spool_finding(cfg: MeshConfig) -> Finding:
    """Records a gateway spooled but has not delivered wait on disk outside the chain.

    A live gateway delivers its records every flush interval, so a record seen once may
    just be in flight: only what is still undelivered a few intervals later counts."""
    folder = audit_spool(cfg)
    before = spool_backlog(folder)
    if any(records > acked for records, acked in before.values()):
        time.sleep(min(3 * cfg.gateway.audit_flush_interval_s + 0.5, 10.0))
        waiting = stranded_records(before, spool_backlog(folder))
    else:
        waiting = 0
    if not waiting:
        return "pass", f"no audit records waiting in the gateway spool ({folder})"
    return "warn", (
        f"{waiting} audit record(s) in {folder} are not yet in the hash chain: they can be "
        "altered or deleted undetected until a gateway delivers them"
    )


def audit_log(cfg: MeshConfig) -> Check:
    return make_check("audit_log", "Tamper-evident audit log", [audit_chain_finding(cfg), audit_spool_finding(cfg)])
