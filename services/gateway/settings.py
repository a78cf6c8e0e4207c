"""The gateway's section of the mesh configuration (``gateway:``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmesh.runtime.config import Section, ServerSettings


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
    masking: dict[str, str] = {}
    default_timeout_s: float = 120.0
    # Audit records go to the security service in batches at least this often.
    audit_flush_interval_s: float = Field(default=0.5, gt=0)
