"""SQLite for services that keep durable state (security, trainer).

WAL journal with ``synchronous=FULL``: a write is on disk when its transaction
commits, and an RPC commits before it answers. One writer connection guarded by a
lock; long reads open their own read-only connection (a consistent snapshot) so they
never hold writers up. Other processes (the trainer's worker) open their own writer
connections: SQLite serialises them with ``busy_timeout``. All blocking calls from
async code run in worker threads.

Stored state evolves one way: each store lists its ``Migration``s (version 1 is its
first schema) and :func:`migrate` brings a database forward at open, recording the
version in ``PRAGMA user_version``. All pending migrations run in one transaction, so
a database is at its old version or the new one, never between; a database written by
a newer version is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from llmesh.runtime.errors import Unavailable

T = TypeVar("T")


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


@dataclass(frozen=True)
class Migration:
    """One step of a store's schema: ``sql`` (statements, run in order) and/or ``apply``
    (for rewrites SQL cannot express), taking the database to ``version``."""

    version: int
    description: str
    sql: str = ""
    apply: Callable[[sqlite3.Connection], None] | None = None


def statements(sql: str) -> Iterator[str]:
    """The statements of a script (``execute`` runs one at a time and, unlike
    ``executescript``, inside the caller's transaction)."""
    buf = ""
    for piece in sql.split(";"):
        buf += piece + ";"
        if sqlite3.complete_statement(buf):  # a ";" inside a string or comment is not an end
            if any(line.strip() and not line.strip().startswith("--") for line in buf[:-1].splitlines()):
                yield buf
            buf = ""


def _legacy_version(conn: sqlite3.Connection) -> int:
    """The version a database written before ``user_version`` was used recorded in
    ``meta.schema_version`` (0 when there is none)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is None:
        return 0
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row is not None else 0


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, migrations: Sequence[Migration], *, name: str = "database") -> int:
    """Brings the database on ``conn`` to the last of ``migrations`` (versions 1, 2, …
    in order) in one transaction and returns that version. Refuses a database whose
    version is newer than this code's."""
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"{name}: migrations must be numbered 1..n in order, got {versions}")
    latest = len(migrations)
    with transaction(conn):
        current = schema_version(conn)
        if current == 0 and (legacy := _legacy_version(conn)):
            current = legacy  # adopted below; the old marker goes
            conn.execute("DELETE FROM meta WHERE key = 'schema_version'")
        if current > latest:
            raise RuntimeError(
                f"{name}: schema version {current} is newer than this service knows ({latest}): "
                "run the release that wrote it, or restore a backup"
            )
        for m in migrations[current:]:
            for stmt in statements(m.sql):
                conn.execute(stmt)
            if m.apply is not None:
                m.apply(conn)
        conn.execute(f"PRAGMA user_version = {latest:d}")
    return latest


class Database:
    """A service's database, migrated forward (:func:`migrate`) when it opens."""

    def __init__(self, path: Path, migrations: Sequence[Migration]) -> None:
        self.path = path
        self.migrations = tuple(migrations)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    @property
    def schema_version(self) -> int:
        return len(self.migrations)

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    def open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = connect(self.path)
        try:
            migrate(conn, self.migrations, name=str(self.path))
        except BaseException:
            conn.close()
            raise
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
