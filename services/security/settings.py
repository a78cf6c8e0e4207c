"""The security service's section of the mesh configuration (``security:``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmesh.runtime.config import Section, ServerSettings


class SecuritySettings(Section):
    server: ServerSettings = ServerSettings(port=50062, metrics_port=9462)
    # JWT "iss" and "aud" of issued tokens.
    issuer: str = "llmesh"
    audience: str = "llmesh-gateway"
    # Longest token lifetime; also how long a rotated-out signing key stays in the JWKS.
    token_ttl_seconds: int = Field(default=900, ge=1, le=86_400)
    # HS256 is for development only: tokens are signed with a secret shared with the
    # gateway (LLMESH_HOME/security/jwt-hs256.key) instead of a key published as JWKS.
    signing_algorithm: Literal["ES256", "RS256", "HS256"] = "ES256"
