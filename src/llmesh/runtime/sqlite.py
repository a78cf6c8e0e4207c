"""SQLite for services that keep durable state (security, trainer).

WAL journal with ``synchronous=FULL``: a write is on disk when its transaction
commits, and an RPC commits before it answers. One writer connection guarded by a
lock; long reads open their own read-only connection (a consistent snapshot) so they
never hold writers up. Other processes (the trainer's worker) open their own writer
connections: SQLite serialises them with ``busy_timeout``. All blocking calls from
async code run in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from llmesh.runtime.errors import Unavailable

T = TypeVar("T")
META = """
CREATE TABLE IF NOT EXISTS meta (
  key TEXT PRIMARY KEY,
  value TEXT NOT NULL
);
"""


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
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
    """A service's database: ``schema`` (idempotent DDL) applied at open, with a
    ``meta.schema_version`` that refuses a database written by a newer version."""

    def __init__(self, path: Path, schema: str, schema_version: int) -> None:
        self.path = path
        self.schema = schema
        self.schema_version = schema_version
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    def open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = connect(self.path)
        conn.executescript(META + self.schema)  # idempotent (IF NOT EXISTS)
        with transaction(conn):
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta(key, value) VALUES ('schema_version', ?)", (str(self.schema_version),))
            elif int(row["value"]) > self.schema_version:
                raise RuntimeError(
                    f"{self.path}: schema version {row['value']} is newer than this service ({self.schema_version})"
                )
        self._conn = conn

    def close_sync(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def call_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            if self._conn is None:
                raise Unavailable("the service is starting (database not open yet)", retry_after_s=1.0)
            return fn(self._conn)

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Runs ``fn`` on the writer connection, in a worker thread, under the lock."""
        return await asyncio.to_thread(self.call_sync, fn)

    def _read_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = connect(self.path, readonly=True)
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
