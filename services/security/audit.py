"""The append-only, hash-chained audit log.

Each record's ``hash = hex(sha256(prev_hash || canonical_json(record)))`` where
``prev_hash`` is the previous record's hash as 64 ASCII hex characters (64 "0"
for the first) and ``canonical_json`` is UTF-8 JSON with sorted keys and no
spaces of ``{sequence, time_us, actor, action, resource, outcome, attributes}``.
Sequences start at 1 with no gaps. The head (last sequence and hash) is also
kept in ``meta``, so truncating the tail is detected as well.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from llmesh.runtime.errors import InvalidArgument
from llmesh.services.security.store import transaction

GENESIS = "0" * 64
MAX_BATCH = 1000
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
LIMITS = {"actor": 256, "action": 256, "resource": 1024, "outcome": 64}
MAX_ATTRIBUTES = 64
MAX_ATTRIBUTE_KEY = 128
MAX_ATTRIBUTE_VALUE = 4096


@dataclass(frozen=True)
class AuditEntry:
    actor: str
    action: str
    resource: str = ""
    outcome: str = ""
    attributes: Mapping[str, str] | None = None


@dataclass(frozen=True)
class StoredRecord:
    sequence: int
    time_us: int
    actor: str
    action: str
    resource: str
    outcome: str
    attributes: dict[str, str]
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class Verification:
    intact: bool
    records: int
    first_bad_sequence: int = 0
    detail: str = ""


def canonical_json(sequence: int, time_us: int, e: AuditEntry | StoredRecord) -> bytes:
    doc = {
        "sequence": sequence,
        "time_us": time_us,
        "actor": e.actor,
        "action": e.action,
        "resource": e.resource,
        "outcome": e.outcome,
        "attributes": dict(e.attributes or {}),
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def chain_hash(prev_hash: str, canonical: bytes) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + canonical).hexdigest()


def validate(e: AuditEntry, prefix: str = "") -> AuditEntry:
    for name in ("actor", "action"):
        if not getattr(e, name).strip():
            raise InvalidArgument(prefix + name, "must not be empty")
    for name, limit in LIMITS.items():
        if len(getattr(e, name)) > limit:
            raise InvalidArgument(prefix + name, f"at most {limit} characters")
    attrs = dict(e.attributes or {})
    if len(attrs) > MAX_ATTRIBUTES:
        raise InvalidArgument(prefix + "attributes", f"at most {MAX_ATTRIBUTES} entries")
    for k, v in attrs.items():
        if not k or len(k) > MAX_ATTRIBUTE_KEY:
            raise InvalidArgument(prefix + "attributes", f"keys must be 1-{MAX_ATTRIBUTE_KEY} characters")
        if len(v) > MAX_ATTRIBUTE_VALUE:
            raise InvalidArgument(f"{prefix}attributes[{k[:40]}]", f"at most {MAX_ATTRIBUTE_VALUE} characters")
    return AuditEntry(e.actor, e.action, e.resource, e.outcome, attrs)


def _row(r: sqlite3.Row) -> StoredRecord:
    return StoredRecord(
        r["sequence"],
        r["time_us"],
        r["actor"],
        r["action"],
        r["resource"],
        r["outcome"],
        json.loads(r["attributes"]),
        r["prev_hash"],
        r["hash"],
    )


def _head(conn: sqlite3.Connection) -> tuple[int, str]:
    r = conn.execute("SELECT value FROM meta WHERE key = 'audit_head'").fetchone()
    if r is None:
        return 0, GENESIS
    seq, h = r["value"].split(":", 1)
    return int(seq), h


class AuditLog:
    def append_sync(self, conn: sqlite3.Connection, entries: Iterable[AuditEntry]) -> list[StoredRecord]:
        """Appends all entries in one transaction (all or none); validated first."""
        batch = list(entries)
        if not batch:
            raise InvalidArgument("records", "must not be empty")
        if len(batch) > MAX_BATCH:
            raise InvalidArgument("records", f"at most {MAX_BATCH} per batch")
        many = len(batch) > 1
        batch = [validate(e, f"records[{i}]." if many else "") for i, e in enumerate(batch)]
        out = []
        with transaction(conn):
            seq, prev = _head(conn)
            for e in batch:
                seq += 1
                time_us = time.time_ns() // 1000
                h = chain_hash(prev, canonical_json(seq, time_us, e))
                attrs = json.dumps(dict(e.attributes or {}), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
                conn.execute(
                    "INSERT INTO audit(sequence, time_us, actor, action, resource, outcome, attributes, prev_hash, hash) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (seq, time_us, e.actor, e.action, e.resource, e.outcome, attrs, prev, h),
                )
                out.append(
                    StoredRecord(
                        seq, time_us, e.actor, e.action, e.resource, e.outcome, dict(e.attributes or {}), prev, h
                    )
                )
                prev = h
            conn.execute(
                "INSERT INTO meta(key, value) VALUES ('audit_head', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (f"{seq}:{prev}",),
            )
        return out

    @staticmethod
    def query_sync(
        conn: sqlite3.Connection, actor: str, action: str, since_us: int, limit: int, after_sequence: int
    ) -> list[StoredRecord]:
        if limit > MAX_LIMIT:
            raise InvalidArgument("limit", f"at most {MAX_LIMIT}")
        q, args = "SELECT * FROM audit WHERE sequence > ?", list[object]([after_sequence])
        if actor:
            q, args = q + " AND actor = ?", [*args, actor]
        if action:
            q, args = q + " AND action = ?", [*args, action]
        if since_us:
            q, args = q + " AND time_us >= ?", [*args, since_us]
        return [_row(r) for r in conn.execute(q + " ORDER BY sequence LIMIT ?", [*args, limit or DEFAULT_LIMIT])]

    @staticmethod
    def verify_sync(conn: sqlite3.Connection) -> Verification:
        """Walks the chain from sequence 1; reports the first record that is missing,
        out of place, or whose hash does not follow from its content and predecessor."""
        n = conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
        expected_seq, prev = 1, GENESIS
        for r in conn.execute("SELECT * FROM audit ORDER BY sequence"):
            rec = _row(r)
            if rec.sequence != expected_seq:
                return Verification(
                    False, n, expected_seq, f"record {expected_seq} is missing (next is {rec.sequence})"
                )
            if rec.prev_hash != prev:
                return Verification(False, n, rec.sequence, "prev_hash does not match the previous record's hash")
            h = chain_hash(prev, canonical_json(rec.sequence, rec.time_us, rec))
            if h != rec.hash:
                return Verification(False, n, rec.sequence, "hash does not match the record's content")
            prev = h
            expected_seq += 1
        head_seq, head_hash = _head(conn)
        if head_seq != expected_seq - 1 or (head_seq and head_hash != prev):
            if head_seq >= expected_seq:
                return Verification(
                    False, n, expected_seq, f"records {expected_seq}..{head_seq} are missing (log truncated)"
                )
            return Verification(
                False,
                n,
                head_seq + 1 if head_seq < expected_seq - 1 else head_seq,
                "the log head recorded at append time does not match the last record",
            )
        return Verification(True, n)
