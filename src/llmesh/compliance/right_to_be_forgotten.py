"""Right to be forgotten: the erasing RPCs exist in the contracts and their servicers
implement them, conversations expire on their own, and what is never erased is said."""

from __future__ import annotations

from llmesh.compliance.contracts import INFERENCE, SECURITY, implementation_finding
from llmesh.compliance.findings import Check, Finding, make_check
from llmesh.config import MeshConfig
from llmesh.pb.inference.v1 import inference_pb2_grpc
from llmesh.pb.security.v1 import security_pb2_grpc
from llmesh.services.gateway.routes import service_descriptor
from llmesh.services.inference.servicer import InferenceServicer
from llmesh.services.security.servicer import SecurityServicer


def right_to_be_forgotten(cfg: MeshConfig) -> Check:
    inference, security = service_descriptor(INFERENCE), service_descriptor(SECURITY)
    ttl = cfg.inference.chat_ttl_seconds
    erasers = [m.name for m in security.methods if m.name.startswith(("Delete", "Purge", "Erase"))]
    findings: list[Finding] = [
        implementation_finding(
            inference,
            "DeleteConversation",
            InferenceServicer,
            inference_pb2_grpc.InferenceServicer,
            "erase a conversation on request",
        ),
        implementation_finding(
            security,
            "RevokeApiKey",
            SecurityServicer,
            security_pb2_grpc.SecurityServicer,
            "revoke a subject's API keys",
        ),
        ("pass", f"conversation keys carry a TTL (inference.chat_ttl_seconds={ttl}): forgotten without a request")
        if ttl > 0
        else ("warn", f"inference.chat_ttl_seconds={ttl}: conversation keys carry no usable TTL"),
    ]
    if not erasers:
        findings.append(
            (
                "warn",
                f"{security.name} has no Delete/Purge RPC: revoked API keys keep owner/tenant in "
                "security.db, and audit records keep actor ids (append-only hash chain)",
            )
        )
    return make_check("right_to_be_forgotten", "Right to be forgotten", findings)
