"""Stored state evolves one way: ``runtime.sqlite.migrate`` (ordered migrations in one
transaction, the version in ``PRAGMA user_version``), and the security and trainer
stores open databases written by the previous schema layout and carry them forward."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from llmesh.runtime.sqlite import Database, Migration, connect, migrate, schema_version, statements
from llmesh.services.security import store as security_store
from llmesh.services.security.audit import AuditEntry, AuditLog
from llmesh.services.trainer import store as trainer_store

V1 = Migration(1, "notes", "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL); -- one; two")
V2 = Migration(
    2, "authors", "ALTER TABLE notes ADD COLUMN author TEXT NOT NULL DEFAULT '';\nCREATE INDEX n_a ON notes(author);"
)


def _upper(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE notes SET body = upper(body)")


V3 = Migration(3, "shout", apply=_upper)


def test_statements_split_on_real_terminators_only() -> None:
    sql = "CREATE TABLE t (v TEXT DEFAULT 'a;b'); -- note; not a statement\nINSERT INTO t VALUES ('x;y');\n"
    assert [s.strip() for s in statements(sql)] == [
        "CREATE TABLE t (v TEXT DEFAULT 'a;b');",
        "-- note; not a statement\nINSERT INTO t VALUES ('x;y');",
    ]


def test_a_new_database_gets_every_migration(tmp_path: Path) -> None:
    conn = connect(tmp_path / "n.db")
    assert migrate(conn, [V1, V2, V3]) == 3 and schema_version(conn) == 3
    conn.execute("INSERT INTO notes(body, author) VALUES ('hi', 'ann')")
    assert migrate(conn, [V1, V2, V3]) == 3  # idempotent: nothing pending
    assert conn.execute("SELECT body FROM notes").fetchone()[0] == "hi"


def test_an_old_database_moves_forward_in_order(tmp_path: Path) -> None:
    conn = connect(tmp_path / "n.db")
    migrate(conn, [V1])
    conn.execute("INSERT INTO notes(body) VALUES ('hi')")
    assert migrate(conn, [V1, V2, V3]) == 3
    assert tuple(conn.execute("SELECT body, author FROM notes").fetchone()) == ("HI", "")


def test_a_failing_migration_leaves_the_database_as_it_was(tmp_path: Path) -> None:
    conn = connect(tmp_path / "n.db")
    migrate(conn, [V1])
    broken = Migration(3, "broken", "CREATE TABLE half (x); INSERT INTO nowhere VALUES (1);")
    with pytest.raises(sqlite3.OperationalError, match="no such table: nowhere"):
        migrate(conn, [V1, V2, broken])
    assert schema_version(conn) == 1  # V2 and the half of V3 rolled back with it
    assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] == ["notes"]
    assert "author" not in [r[1] for r in conn.execute("PRAGMA table_info(notes)")]


def test_a_newer_database_is_refused(tmp_path: Path) -> None:
    conn = connect(tmp_path / "n.db")
    migrate(conn, [V1, V2])
    with pytest.raises(RuntimeError, match=r"schema version 2 is newer than this service knows \(1\)"):
        migrate(conn, [V1], name="n.db")


def test_migrations_must_be_numbered_in_order(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"numbered 1..n in order, got \[2\]"):
        migrate(connect(tmp_path / "n.db"), [V2])


# The layout both stores wrote before PRAGMA user_version: version 1 recorded in a
# meta table (created by the runtime), user_version left at 0.
PREVIOUS_META = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta(key, value) VALUES ('schema_version', '1');
"""
PREVIOUS_SECURITY_DDL = """
CREATE TABLE data_keys (version INTEGER PRIMARY KEY, wrapped BLOB NOT NULL, created_at REAL NOT NULL);
CREATE TABLE api_keys (key_id TEXT PRIMARY KEY, owner TEXT NOT NULL, tenant TEXT NOT NULL, scopes TEXT NOT NULL,
  roles TEXT NOT NULL, secret_ct BLOB NOT NULL, created_at REAL NOT NULL, expires_at REAL, revoked_at REAL,
  rotated_at REAL);
CREATE INDEX api_keys_owner ON api_keys(owner, tenant);
CREATE TABLE signing_keys (kid TEXT PRIMARY KEY, algorithm TEXT NOT NULL, private_ct BLOB NOT NULL,
  public_jwk TEXT NOT NULL, created_at REAL NOT NULL, superseded_at REAL, retire_at REAL);
CREATE TABLE audit (sequence INTEGER PRIMARY KEY, time_us INTEGER NOT NULL, actor TEXT NOT NULL,
  action TEXT NOT NULL, resource TEXT NOT NULL, outcome TEXT NOT NULL, attributes TEXT NOT NULL,
  prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
CREATE INDEX audit_actor ON audit(actor, sequence);
CREATE INDEX audit_action ON audit(action, sequence);
CREATE INDEX audit_time ON audit(time_us);
"""
PREVIOUS_TRAINER_DDL = """
CREATE TABLE datasets (dataset_id TEXT PRIMARY KEY, name TEXT NOT NULL, format TEXT NOT NULL,
  train_examples INTEGER NOT NULL, eval_examples INTEGER NOT NULL, duplicates INTEGER NOT NULL,
  sha256 TEXT NOT NULL, created_by TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE jobs (job_id TEXT PRIMARY KEY, state TEXT NOT NULL, dataset_id TEXT NOT NULL,
  adapter_name TEXT NOT NULL, params TEXT NOT NULL, progress TEXT NOT NULL DEFAULT '{}', base_eval TEXT,
  tuned_eval TEXT, adapter_ref TEXT NOT NULL DEFAULT '', error TEXT NOT NULL DEFAULT '',
  attempts INTEGER NOT NULL DEFAULT 0, cancel_requested INTEGER NOT NULL DEFAULT 0, created_by TEXT NOT NULL,
  created_at REAL NOT NULL, finished_at REAL);
CREATE INDEX jobs_state ON jobs(state, created_at);
CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, kind TEXT NOT NULL,
  message TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX events_job ON events(job_id, id);
CREATE TABLE adapters (name TEXT NOT NULL, version INTEGER NOT NULL, job_id TEXT NOT NULL,
  base_model TEXT NOT NULL, base_model_sha256 TEXT NOT NULL, dataset_id TEXT NOT NULL,
  hyperparameters TEXT NOT NULL, base_eval TEXT NOT NULL, tuned_eval TEXT NOT NULL,
  min_improvement REAL NOT NULL, created_by TEXT NOT NULL, created_at REAL NOT NULL,
  PRIMARY KEY (name, version));
CREATE TABLE aliases (name TEXT NOT NULL, alias TEXT NOT NULL, version INTEGER NOT NULL,
  history TEXT NOT NULL DEFAULT '[]', PRIMARY KEY (name, alias));
CREATE TABLE splits (name TEXT NOT NULL, alias TEXT NOT NULL, arms TEXT NOT NULL, PRIMARY KEY (name, alias));
"""


def _previous(path: Path, ddl: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(PREVIOUS_META + ddl)
    return conn


def _tables(conn: sqlite3.Connection) -> dict[str, list[str]]:
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    return {n: [c[1] for c in conn.execute(f"PRAGMA table_info({n})")] for n in names if n != "sqlite_sequence"}


def _fresh(db: Database) -> dict[str, list[str]]:
    db.open_sync()
    try:
        return db.call_sync(_tables)
    finally:
        db.close_sync()


def test_security_store_migrates_a_previous_database(tmp_path: Path) -> None:
    old = _previous(tmp_path / "security.db", PREVIOUS_SECURITY_DDL)
    conn = connect(tmp_path / "security.db")
    AuditLog().append_sync(conn, [AuditEntry("alice", "inference.Generate", "m", "ok", {})])  # data written before
    conn.close()
    db = security_store.open_database(tmp_path / "security.db")
    db.open_sync()
    try:
        conn = db.call_sync(lambda c: c)
        assert schema_version(conn) == security_store.SCHEMA_VERSION
        assert conn.execute("SELECT key FROM meta").fetchall() != []  # audit_head kept
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() is None
        (rec,) = AuditLog().append_sync(conn, [AuditEntry("bob", "inference.Generate", "m", "ok", {})])
        assert rec.sequence == 2  # the chain continues from the migrated head
        migrated = _tables(conn)
    finally:
        db.close_sync()
    old.close()
    assert migrated == _fresh(security_store.open_database(tmp_path / "new.db"))


def test_trainer_store_migrates_a_previous_database(tmp_path: Path) -> None:
    old = _previous(tmp_path / "trainer.db", PREVIOUS_TRAINER_DDL)
    old.execute("INSERT INTO aliases(name, alias, version) VALUES ('faq', 'live', 1)")  # a row the previous layout held
    old.close()
    db = trainer_store.open_database(tmp_path / "trainer.db")
    db.open_sync()
    try:
        conn = db.call_sync(lambda c: c)
        assert schema_version(conn) == trainer_store.SCHEMA_VERSION
        assert tuple(conn.execute("SELECT name, alias, version, history FROM aliases").fetchone()) == (
            "faq",
            "live",
            1,
            "[]",
        )
        migrated = {n: cols for n, cols in _tables(conn).items() if n != "meta"}  # the previous marker's table
    finally:
        db.close_sync()
    assert migrated == _fresh(trainer_store.open_database(tmp_path / "new.db"))
