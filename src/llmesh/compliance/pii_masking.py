"""PII masking: which contract fields are PII or SECRET, which routed methods the gateway
masks, the operators in force, and a self-test that masks a request as the gateway does."""

from __future__ import annotations

from llmesh.compliance.contracts import public_services, sensitive_fields
from llmesh.compliance.findings import Check, Finding, make_check
from llmesh.config import MeshConfig
from llmesh.pb.inference.v1 import inference_pb2
from llmesh.services.gateway.fields import has_pii, mask_message
from llmesh.services.gateway.masking import DEFAULT_OPERATORS, Masker, Operator, Vault
from llmesh.services.gateway.routes import service_descriptor

# A synthetic CN mobile number for the masking self-test (not a real subscriber).
SAMPLE_PHONE = "13812348000"


def masking_self_test(cfg: MeshConfig) -> Finding:
    """Mask a request exactly as the gateway does (same Masker construction, same
    field-policy walk) and check the phone number is gone."""
    try:  # as gateway/__main__.py builds it
        masker = Masker(operators={entity: Operator(op) for entity, op in cfg.gateway.masking.items()} or None)
    except ValueError as e:
        return "fail", f"gateway.masking is invalid (the gateway would not start): {e}"
    sample = f"请回拨 {SAMPLE_PHONE} 谢谢"
    msg = inference_pb2.GenerateRequest(prompt=sample)
    counts = mask_message(msg, masker, Vault())
    seen = f"self-test: GenerateRequest.prompt {sample!r} → {msg.prompt!r} (entities {counts})"
    return ("fail", f"{seen}: the number survived") if SAMPLE_PHONE in msg.prompt else ("pass", seen)


def pii_masking(cfg: MeshConfig) -> Check:
    fields = sensitive_fields(public_services())
    routed = [service_descriptor(name) for name in cfg.gateway.upstreams]
    routed_pii = sensitive_fields(routed)["pii"]
    masked_methods = [f"{s.name}/{m.name}" for s in routed for m in s.methods if has_pii(m.input_type)]
    pii = fields["pii"]
    if cfg.gateway.masking:
        ops = (
            ", ".join(f"{k}={v}" for k, v in sorted(cfg.gateway.masking.items())) + " (gateway.masking; others default)"
        )
    else:
        ops = ", ".join(f"{k}={v.value}" for k, v in DEFAULT_OPERATORS.items()) + " (defaults from masking.py)"
    findings: list[Finding] = [
        (
            "pass" if pii else "warn",
            f"{len(pii)} field(s) marked field_policy PII in the contracts, {len(routed_pii)} "
            f"in routed services, e.g. {', '.join((routed_pii or pii)[:4])}",
        ),
        ("pass", f"{len(fields['secret'])} field(s) marked SECRET (never logged or audited in clear)"),
        (
            "pass",
            f"{len(masked_methods)} routed method(s) have PII in their request, masked at the gateway "
            f"before forwarding: {', '.join(masked_methods[:6])}{' …' if len(masked_methods) > 6 else ''}",
        ),
        ("pass", f"operators: {ops}"),
        masking_self_test(cfg),
    ]
    return make_check("pii_masking", "PII masking", findings)
