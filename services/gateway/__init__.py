"""The gateway: the mesh's only public port (50051). It owns the front-door policy of
every public RPC: JWT + HMAC signature checks, scopes, rate limits and request nonces,
PII masking (restored in answers), and an audit record per call. Its state is shared or
spooled: rate-limit counters and nonces in Redis (db 1, shared by all replicas), audit
records not yet delivered in ``LLMESH_HOME/gateway/audit-spool/``. It calls security
(JWKS, API key secrets, audit) and forwards to the upstreams of ``gateway.upstreams``
(inference, security, trainer, embedding, retrieval)."""
