"""The service's SQLite database (``LLMESH_HOME/security/security.db``).

WAL journal with ``synchronous=FULL``: a write is on disk when its transaction
commits, and every RPC commits before it answers. One writer connection guarded
by a lock; long reads (audit query and verification) open their own connection
so they never hold writers up. All blocking calls run in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from pathlib import Path
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")

SCHEMA_VERSION = 1
SCHEMA = """
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


def _connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.row_factory = sqlite3.Row
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE … COMMIT, rolled back on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class Database:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    def open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = _connect(self.path)
        conn.executescript(SCHEMA)  # idempotent (IF NOT EXISTS)
        with transaction(conn):
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row["value"]) > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path}: schema version {row['value']} is newer than this service ({SCHEMA_VERSION})")
        self._conn = conn

    def close_sync(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def call_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            if self._conn is None:
                raise RuntimeError("database is closed")
            return fn(self._conn)

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Runs ``fn`` on the writer connection, in a worker thread, under the lock."""
        return await asyncio.to_thread(self.call_sync, fn)

    def _read_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = _connect(self.path, readonly=True)
        try:
            conn.execute("BEGIN")  # one snapshot for the whole read
            try:
                return fn(conn)
            finally:
                conn.execute("COMMIT")
        finally:
            conn.close()

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Runs ``fn`` on a fresh read-only connection (a consistent snapshot) in a worker thread."""
        return await asyncio.to_thread(self._read_sync, fn)
