"""The security service (50062): API keys, JWTs with JWKS, envelope encryption, the
published masking rules and the hash-chained audit log. Its state lives in
``LLMESH_HOME/security/``: ``security.db`` (SQLite, WAL), ``master.key`` (back it up with
the database) and the mesh's shared secrets (``internal.key``, ``jwt-hs256.key``). It calls
no peer: the gateway and operators' tools call it."""
