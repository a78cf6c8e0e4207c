"""The gateway's section of the mesh configuration (``gateway:``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import Field, field_validator

from llmesh.auth.pii import Operator
from llmesh.pb.common.v1 import options_pb2
from llmesh.runtime.config import Section, ServerSettings
from llmesh.services.gateway.masking import CONFIGURABLE_ENTITIES
from llmesh.services.gateway.routes import PUBLIC_SERVICES

# The ``rate_limit_class`` method option by number, as the rate_limits table names it
# ("read", "write", ...): every public method is counted in one of these classes.
RATE_LIMIT_CLASSES: Mapping[int, str] = {
    v.number: v.name.removeprefix("RATE_LIMIT_CLASS_").lower()
    for v in options_pb2.RateLimitClass.DESCRIPTOR.values
    if v.number != options_pb2.RATE_LIMIT_CLASS_UNSPECIFIED
}


class GatewayPeers(Section):
    security: str
    redis: str


class RateLimitSettings(Section):
    requests: int = Field(ge=1)
    window_s: float = Field(gt=0)


def _default_limits() -> dict[str, RateLimitSettings]:
    per_minute = {"read": 600, "write": 120, "generate": 120, "embed": 600, "job": 10, "admin": 60}
    return {k: RateLimitSettings(requests=v, window_s=60) for k, v in per_minute.items()}


class GatewaySettings(Section):
    server: ServerSettings
    peers: GatewayPeers
    # Public service name → upstream address; only these are exposed.
    upstreams: dict[str, str]
    issuer: str = "llmesh"
    audience: str = "llmesh-gateway"
    # Accepted token algorithms; HS256 (development) verifies with the shared
    # LLMESH_HOME/security/jwt-hs256.key, the others with the security service's JWKS.
    jwt_algorithms: list[Literal["ES256", "RS256", "HS256"]] = Field(default=["ES256", "RS256"], min_length=1)
    jwt_leeway_s: float = 30.0
    # HMAC request signatures on every authenticated call; timestamps within ±skew.
    require_signature: bool = True
    signature_skew_s: float = 300.0
    rate_limits: dict[str, RateLimitSettings] = Field(default_factory=_default_limits)
    tokens_per_minute: int = 20_000
    # Entity → operator (mask, redact, hash, pseudonymize); see gateway/masking.py.
    masking: dict[str, Operator] = {}
    default_timeout_s: float = 120.0
    # Audit records go to the security service in batches at least this often.
    audit_flush_interval_s: float = Field(default=0.5, gt=0)
    # Every call's audit record is in the local spool (LLMESH_HOME/gateway/audit-spool)
    # before its response is released, fsynced with those of concurrent calls. false:
    # written but not fsynced, so a killed gateway still loses nothing but a host crash
    # may (for measuring what fsync costs, not for production).
    audit_fsync: bool = True

    # Refused here, at start-up, rather than as INTERNAL on every call of a method whose
    # class has no limit.
    @field_validator("rate_limits", mode="before")
    @classmethod
    def _every_class_limited(cls, v: object) -> object:
        if not isinstance(v, Mapping):
            return v  # the type check says what is wrong
        known = list(RATE_LIMIT_CLASSES.values())
        for name in v:
            if name not in known:
                raise ValueError(f"unknown rate-limit class '{name}' (known: {', '.join(known)})")
        for name in known:
            if name not in v:
                raise ValueError(f"no limit for class '{name}', which public methods are counted in")
        return v

    @field_validator("upstreams")
    @classmethod
    def _known_services(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if name not in PUBLIC_SERVICES:
                raise ValueError(f"unknown service '{name}' (known: {', '.join(PUBLIC_SERVICES)})")
        return v

    @field_validator("masking")
    @classmethod
    def _known_entities(cls, v: dict[str, Operator]) -> dict[str, Operator]:
        for name in v:  # a typo would otherwise fail the gateway's start, not the config load
            if name not in CONFIGURABLE_ENTITIES:
                raise ValueError(f"unknown entity '{name}' (known: {', '.join(sorted(CONFIGURABLE_ENTITIES))})")
        return v
