"""Access control: request signatures, token signing, the internal identity key, live
proof that each service refuses a call without identity, the contracts' method policies,
and whether Redis asks for a password."""

from __future__ import annotations

import redis
from google.protobuf.descriptor import ServiceDescriptor

from llmesh.compliance.addresses import display_url
from llmesh.compliance.contracts import INFERENCE, SECURITY, count_policies, public_services
from llmesh.compliance.findings import Check, Finding, make_check
from llmesh.compliance.probes import private_file, redis_config, security_dir, unauthenticated_probe
from llmesh.config import MeshConfig
from llmesh.runtime.identity import HS256_SECRET, INTERNAL_SECRET

# Read-only, side-effect-free RPCs used to knock on a service's door without an identity.
PROBE_METHODS = {INFERENCE: f"/{INFERENCE}/ListTemplates", SECURITY: f"/{SECURITY}/GetMaskingRules"}


def policy_findings(services: list[ServiceDescriptor]) -> list[Finding]:
    c = count_policies(services)
    out: list[Finding] = [
        (
            "pass",
            f"method_policy in {len(services)} services: {c.total} methods, {c.scoped} need a "
            f"scope/role, {len(c.anonymous)} anonymous ({', '.join(c.anonymous) or 'none'}), "
            f"{c.implemented} implemented",
        )
    ]
    if c.unguarded:
        out.append(
            (
                "warn",
                f"{len(c.unguarded)} method(s) with no scope, role or anonymous flag: {', '.join(c.unguarded[:5])}",
            )
        )
    return out


def token_signing_findings(cfg: MeshConfig) -> list[Finding]:
    alg, accepted = cfg.security.signing_algorithm, cfg.gateway.jwt_algorithms
    seen = f"security.signing_algorithm={alg}, gateway.jwt_algorithms={','.join(accepted)}"
    if alg != "HS256" and "HS256" not in accepted:
        return [("pass", f"{seen}: tokens are checked against the security service's published keys (JWKS)")]
    return [
        ("warn", f"{seen}: HS256 development mode, tokens signed with a secret the gateway shares"),
        private_file(security_dir(cfg) / HS256_SECRET, "HS256 token secret"),
    ]


def redis_auth_finding(url: str) -> Finding:
    where = f"Redis at {display_url(url)}"
    try:
        conf = redis_config(url, "requirepass")
    except redis.RedisError as e:
        return "fail", f"{where} unreachable or CONFIG refused: {e}"
    if conf.get("requirepass"):
        return "pass", f"{where}: password required (CONFIG GET requirepass is set)"
    return "warn", (
        f"{where}: no password (CONFIG GET requirepass is empty): any local user can read or "
        "change chat memory, bypassing the internal identity"
    )


def access_control(cfg: MeshConfig) -> Check:
    gw = cfg.gateway
    findings: list[Finding] = [
        ("pass", "gateway.require_signature=true: every authenticated call carries an HMAC signature")
        if gw.require_signature
        else (
            "warn",
            "gateway.require_signature=false: a stolen JWT is enough (no request signature, no replay check)",
        ),
        *token_signing_findings(cfg),
        private_file(security_dir(cfg) / INTERNAL_SECRET, "internal identity key"),
        unauthenticated_probe("inference service", cfg.inference.server.local_address, PROBE_METHODS[INFERENCE]),
        unauthenticated_probe("security service", cfg.security.server.local_address, PROBE_METHODS[SECURITY]),
    ]
    if INFERENCE in gw.upstreams:  # the public port: no JWT must mean no access
        findings.append(unauthenticated_probe("gateway", gw.server.local_address, PROBE_METHODS[INFERENCE]))
    findings += policy_findings(public_services())
    findings.append(redis_auth_finding(cfg.inference.peers.redis))
    return make_check("access_control", "Access control", findings)
