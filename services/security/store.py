"""The security service's SQLite schema (``LLMESH_HOME/security/security.db``) as
ordered migrations; the database handling and the migration runner are the shared
``llmesh.runtime.sqlite``. A schema change is a new ``Migration`` appended to
``MIGRATIONS``, never an edit of an earlier one."""

from __future__ import annotations

from pathlib import Path

from llmesh.runtime.sqlite import Database, Migration, connect, transaction

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "connect", "open_database", "transaction"]

# Version 1: the first schema (databases written before user_version was used record
# it as meta.schema_version = 1; the runner adopts that).
_V1 = """
-- Small named values: 'audit_head' = "<sequence>:<hash>" of the chain's last record.
CREATE TABLE IF NOT EXISTS meta (
  key TEXT PRIMARY KEY,
  value TEXT NOT NULL
);
-- Data keys wrapped by the master key: nonce(12) || AES-256-GCM(key) || tag(16).
CREATE TABLE IF NOT EXISTS data_keys (
  version INTEGER PRIMARY KEY,
  wrapped BLOB NOT NULL,
  created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
  key_id TEXT PRIMARY KEY,
  owner TEXT NOT NULL,
  tenant TEXT NOT NULL,
  scopes TEXT NOT NULL,          -- JSON list
  roles TEXT NOT NULL,           -- JSON list
  secret_ct BLOB NOT NULL,       -- keyring ciphertext, aad "api-key-secret:<key_id>"
  created_at REAL NOT NULL,
  expires_at REAL,
  revoked_at REAL,
  rotated_at REAL
);
CREATE INDEX IF NOT EXISTS api_keys_owner ON api_keys(owner, tenant);
CREATE TABLE IF NOT EXISTS signing_keys (
  kid TEXT PRIMARY KEY,
  algorithm TEXT NOT NULL,
  private_ct BLOB NOT NULL,      -- keyring ciphertext of PKCS#8 DER, aad "signing-key:<kid>"
  public_jwk TEXT NOT NULL,      -- JSON
  created_at REAL NOT NULL,
  superseded_at REAL,            -- no longer signs new tokens
  retire_at REAL                 -- leaves the JWKS
);
CREATE TABLE IF NOT EXISTS audit (
  sequence INTEGER PRIMARY KEY,
  time_us INTEGER NOT NULL,
  actor TEXT NOT NULL,
  action TEXT NOT NULL,
  resource TEXT NOT NULL,
  outcome TEXT NOT NULL,
  attributes TEXT NOT NULL,      -- canonical JSON object
  prev_hash TEXT NOT NULL,
  hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_actor ON audit(actor, sequence);
CREATE INDEX IF NOT EXISTS audit_action ON audit(action, sequence);
CREATE INDEX IF NOT EXISTS audit_time ON audit(time_us);
"""


MIGRATIONS: tuple[Migration, ...] = (Migration(1, "keyring, API keys, signing keys, audit chain", _V1),)
SCHEMA_VERSION = len(MIGRATIONS)


def open_database(path: Path) -> Database:
    return Database(path, MIGRATIONS)
