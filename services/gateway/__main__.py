"""Wiring for ``python -m llmesh.services.gateway``: the mesh's only public port."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from llmesh.config import MeshConfig, load_config
from llmesh.runtime import server
from llmesh.runtime.channels import peer_channel
from llmesh.runtime.identity import HS256_SECRET, InternalIdentity, load_secret
from llmesh.services.gateway.audit import AuditSink
from llmesh.services.gateway.authn import JwtVerifier
from llmesh.services.gateway.masking import Masker
from llmesh.services.gateway.pipeline import Pipeline, SecretCache
from llmesh.services.gateway.proxy import Upstreams
from llmesh.services.gateway.ratelimit import Limit, RateLimiter
from llmesh.services.gateway.routes import build_routes
from llmesh.services.gateway.servicer import GatewayServicer, SecurityJwks


def build(mesh: MeshConfig | None = None) -> server.Service:
    mesh = mesh or load_config()
    cfg = mesh.gateway
    identity = InternalIdentity(load_secret(mesh.home))
    security = peer_channel(cfg.peers.security)
    # One immediate retry: a pooled connection that a Redis restart closed is replaced at
    # once (redis-py's default backoff would outlast the limiter's 0.5 s budget).
    redis = aioredis.Redis.from_url(
        cfg.peers.redis, socket_timeout=1.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 1)
    )
    audit = AuditSink(
        security,
        identity,
        interval_s=cfg.audit_flush_interval_s,
        spool_dir=mesh.home / "gateway" / "audit-spool",
        fsync=cfg.audit_fsync,
    )
    pipeline = Pipeline(
        verifier=JwtVerifier(
            cfg.issuer,
            cfg.audience,
            jwks_fetcher=SecurityJwks(security, identity),
            leeway_s=cfg.jwt_leeway_s,
            allowed_algs=cfg.jwt_algorithms,
            hs256_secret=load_secret(mesh.home, HS256_SECRET) if "HS256" in cfg.jwt_algorithms else None,
        ),
        secrets=SecretCache(security, identity),
        limiter=RateLimiter(
            redis,
            {k: Limit(v.requests, v.window_s) for k, v in cfg.rate_limits.items()},
            tokens_per_minute=cfg.tokens_per_minute,
        ),
        masker=Masker(operators=dict(cfg.masking) or None),
        identity=identity,
        audit=audit,
        require_signature=cfg.require_signature,
        skew_s=cfg.signature_skew_s,
    )
    upstreams = Upstreams(list(cfg.upstreams.values()), cfg.server.max_message_bytes)
    servicer = GatewayServicer(build_routes(cfg.upstreams), upstreams, pipeline.admit, cfg.default_timeout_s)

    async def warmup() -> None:
        await redis.ping()
        await pipeline.verifier.refresh(force=True)
        audit.start()

    async def close() -> None:
        await audit.close()  # flush: audit records of served calls are not lost
        await upstreams.close()
        await security.close()
        await redis.aclose()

    return server.Service("gateway", cfg.server, servicer.register, warmup, close)


if __name__ == "__main__":
    server.main(build, "gateway")
