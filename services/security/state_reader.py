"""Read-only views of the security service's state on disk (``LLMESH_HOME/security/``),
for operator tools such as ``llmesh compliance report``.

The service owns its tables, so what others may learn from them is answered here:
nothing is created or written (the database is opened read-only with the service's own
connection helper, never created), and no secret value leaves this module — only
counts, column names, data-key names and the primary keys of bad rows.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from llmesh.runtime.sqlite import connect
from llmesh.services.security import apikeys, tokens
from llmesh.services.security.keyring import DecryptError, StoredCiphertexts, parse_header, version_name

DATABASE = "security.db"
MASTER_KEY = "master.key"
# The columns the keyring re-wraps on rotation: by construction, every secret column.
ENCRYPTED: tuple[StoredCiphertexts, ...] = (apikeys.STORED, tokens.STORED)


@dataclass(frozen=True)
class CiphertextColumn:
    """What one keyring column holds: how many values, which are not keyring ciphertexts
    (``"<primary key> (<why>)"``) and which data keys the good ones name."""

    column: str  # table.column
    values: int
    bad: list[str]
    data_keys: list[str]


@dataclass(frozen=True)
class AuditSpan:
    records: int
    oldest_time_us: int | None


class SecurityState:
    """An open read-only connection to ``security.db``; use as a context manager."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    @classmethod
    def open(cls, folder: Path) -> SecurityState | None:
        """None when the database does not exist (the service never started there);
        raises ``sqlite3.Error`` when it cannot be opened read-only."""
        path = folder / DATABASE
        return cls(connect(path, readonly=True)) if path.is_file() else None

    def __enter__(self) -> SecurityState:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self._conn.close()

    def data_key_names(self) -> list[str]:
        """Names (``k1``, ``k2``…) of the data keys the master key wraps."""
        return [version_name(r[0]) for r in self._conn.execute("SELECT version FROM data_keys ORDER BY version")]

    def columns(self) -> list[tuple[str, str]]:
        """(table, column) of every column of every table."""
        tables = [r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return [(t, c["name"]) for t in tables for c in self._conn.execute(f"PRAGMA table_info({t})")]

    def encrypted_columns(self) -> set[tuple[str, str]]:
        return {(s.table, s.ct_column) for s in ENCRYPTED}

    def ciphertext_columns(self) -> list[CiphertextColumn]:
        """Every value of every keyring column checked to parse as ``L || kN || nonce ||
        ct || tag`` naming a data key the database holds; anything else is a plaintext
        (or foreign) value."""
        known = set(self.data_key_names())
        out = []
        for s in ENCRYPTED:
            rows = self._conn.execute(f"SELECT {s.key_column} AS k, {s.ct_column} AS ct FROM {s.table}").fetchall()
            bad: list[str] = []
            used: set[str] = set()
            for r in rows:
                try:
                    if not isinstance(r["ct"], bytes):
                        raise DecryptError("stored as text, not a blob")
                    name, _, _ = parse_header(r["ct"])
                    if name not in known:
                        raise DecryptError(f"names unknown data key {name}")
                    used.add(name)
                except DecryptError as e:
                    bad.append(f"{r['k']} ({e})")
            out.append(CiphertextColumn(f"{s.table}.{s.ct_column}", len(rows), bad, sorted(used)))
        return out

    def audit_span(self) -> AuditSpan:
        n, oldest = self._conn.execute("SELECT COUNT(*), MIN(time_us) FROM audit").fetchone()
        return AuditSpan(int(n), None if oldest is None else int(oldest))
