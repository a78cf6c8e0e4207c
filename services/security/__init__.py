"""The security service: API keys, JWTs with JWKS, envelope encryption, masking
rules and the hash-chained audit log, all on one SQLite file."""
