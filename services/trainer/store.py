"""The trainer's durable state (``LLMESH_HOME/trainer/trainer.db``): datasets, the job
queue with progress events, and the adapter registry. Written by the service and by
its worker process (each with its own connection; SQLite serialises the writers)."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from llmesh.runtime.sqlite import Database, Migration, connect, transaction

# Version 1: the first schema. A change is a new Migration appended to MIGRATIONS.
_V1 = """
CREATE TABLE IF NOT EXISTS datasets (
  dataset_id TEXT PRIMARY KEY,     -- content hash of the normalized examples
  name TEXT NOT NULL,
  format TEXT NOT NULL,
  train_examples INTEGER NOT NULL,
  eval_examples INTEGER NOT NULL,
  duplicates INTEGER NOT NULL,
  sha256 TEXT NOT NULL,            -- of the bytes as received
  created_by TEXT NOT NULL,
  created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
  job_id TEXT PRIMARY KEY,
  state TEXT NOT NULL,             -- queued, running, succeeded, failed, cancelled
  dataset_id TEXT NOT NULL,
  adapter_name TEXT NOT NULL,
  params TEXT NOT NULL,            -- JSON: resolved hyperparameters
  progress TEXT NOT NULL DEFAULT '{}',
  base_eval TEXT,                  -- JSON metrics of the base model
  tuned_eval TEXT,                 -- JSON metrics of the adapter
  adapter_ref TEXT NOT NULL DEFAULT '',
  error TEXT NOT NULL DEFAULT '',
  attempts INTEGER NOT NULL DEFAULT 0,
  cancel_requested INTEGER NOT NULL DEFAULT 0,
  created_by TEXT NOT NULL,
  created_at REAL NOT NULL,
  finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, created_at);
CREATE TABLE IF NOT EXISTS events (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  job_id TEXT NOT NULL,
  kind TEXT NOT NULL,
  message TEXT NOT NULL,
  at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, id);
CREATE TABLE IF NOT EXISTS adapters (
  name TEXT NOT NULL,
  version INTEGER NOT NULL,
  job_id TEXT NOT NULL,
  base_model TEXT NOT NULL,
  base_model_sha256 TEXT NOT NULL,
  dataset_id TEXT NOT NULL,
  hyperparameters TEXT NOT NULL,   -- JSON
  base_eval TEXT NOT NULL,         -- JSON
  tuned_eval TEXT NOT NULL,        -- JSON
  min_improvement REAL NOT NULL,
  created_by TEXT NOT NULL,
  created_at REAL NOT NULL,
  PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS aliases (
  name TEXT NOT NULL,
  alias TEXT NOT NULL,
  version INTEGER NOT NULL,
  history TEXT NOT NULL DEFAULT '[]',  -- JSON list of earlier versions (rollback pops it)
  PRIMARY KEY (name, alias)
);
CREATE TABLE IF NOT EXISTS splits (
  name TEXT NOT NULL,
  alias TEXT NOT NULL,
  arms TEXT NOT NULL,                  -- JSON list of [version, weight]
  PRIMARY KEY (name, alias)
);
"""

# Version 2: the prompt format an adapter was trained with ("chat" or "raw"), announced
# in registry.json so that serving applies the same; a job's outcome once evaluated
# (passed, the step kept by early stopping).
_V2 = """
ALTER TABLE adapters ADD COLUMN prompt_format TEXT NOT NULL DEFAULT 'chat';
ALTER TABLE jobs ADD COLUMN outcome TEXT NOT NULL DEFAULT '{}';
"""

TERMINAL = ("succeeded", "failed", "cancelled")


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "datasets, jobs, events, adapter registry", _V1),
    Migration(2, "adapters.prompt_format, jobs.outcome", _V2),
)
SCHEMA_VERSION = len(MIGRATIONS)


def open_database(path: Path) -> Database:
    """Opened (and migrated forward) by the service; the worker only connects."""
    return Database(path, MIGRATIONS)


def worker_connection(path: Path) -> sqlite3.Connection:
    """The worker process's own writer connection."""
    return connect(path)


def add_event(conn: sqlite3.Connection, job_id: str, kind: str, message: str = "") -> None:
    conn.execute(
        "INSERT INTO events(job_id, kind, message, at) VALUES (?, ?, ?, ?)", (job_id, kind, message, time.time())
    )


def update_job(conn: sqlite3.Connection, job_id: str, event: tuple[str, str] | None = None, **fields: Any) -> None:
    """Set ``fields`` (dicts stored as JSON) and append an event, in one transaction."""
    cols = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in fields.items()}
    with transaction(conn):
        if cols:
            sets = ", ".join(f"{k} = ?" for k in cols)
            conn.execute(f"UPDATE jobs SET {sets} WHERE job_id = ?", (*cols.values(), job_id))
        if event is not None:
            add_event(conn, job_id, *event)


def job_row(conn: sqlite3.Connection, job_id: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = conn.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    return row


def known_job_row(conn: sqlite3.Connection, job_id: str) -> sqlite3.Row:
    """The row of a job the caller knows exists (the runner's and the worker's own job)."""
    row = job_row(conn, job_id)
    if row is None:
        raise LookupError(f"no job {job_id}")
    return row


# ---- datasets ----------------------------------------------------------------------------
def insert_dataset(
    conn: sqlite3.Connection,
    dataset_id: str,
    *,
    name: str,
    fmt: str,
    train_examples: int,
    eval_examples: int,
    duplicates: int,
    sha256: str,
    created_by: str,
) -> sqlite3.Row:
    """Record a dataset (the first record of the same content wins) and return its row."""
    with transaction(conn):
        conn.execute(
            "INSERT OR IGNORE INTO datasets(dataset_id, name, format, train_examples, eval_examples, duplicates, "
            "sha256, created_by, created_at) VALUES (?,?,?,?,?,?,?,?,?)",
            (dataset_id, name, fmt, train_examples, eval_examples, duplicates, sha256, created_by, time.time()),
        )
    row: sqlite3.Row = conn.execute("SELECT * FROM datasets WHERE dataset_id = ?", (dataset_id,)).fetchone()
    return row


def dataset_row(conn: sqlite3.Connection, dataset_id: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = conn.execute("SELECT * FROM datasets WHERE dataset_id = ?", (dataset_id,)).fetchone()
    return row


# ---- jobs --------------------------------------------------------------------------------
def create_job(
    conn: sqlite3.Connection, job_id: str, dataset_id: str, params: dict[str, Any], created_by: str
) -> sqlite3.Row | None:
    """Queue a job on an existing dataset; None (and nothing written) when the dataset is unknown."""
    with transaction(conn):
        if dataset_row(conn, dataset_id) is None:
            return None
        conn.execute(
            "INSERT INTO jobs(job_id, state, dataset_id, adapter_name, params, created_by, created_at) "
            "VALUES (?, 'queued', ?, ?, ?, ?, ?)",
            (job_id, dataset_id, params["adapter_name"], json.dumps(params), created_by, time.time()),
        )
        add_event(conn, job_id, "queued", params.get("summary", ""))
    return job_row(conn, job_id)


def recent_jobs(conn: sqlite3.Connection, limit: int) -> list[sqlite3.Row]:
    return list(conn.execute("SELECT * FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,)))


def cancel_job(conn: sqlite3.Connection, job_id: str) -> sqlite3.Row | None:
    """A queued job is cancelled at once; a running one is flagged and its worker stops at
    its next step; a finished one is left as it is. None when the job is unknown."""
    with transaction(conn):
        row = job_row(conn, job_id)
        if row is None or row["state"] in TERMINAL:
            return row
        if row["state"] == "queued":
            conn.execute(
                "UPDATE jobs SET state = 'cancelled', cancel_requested = 1, finished_at = ? WHERE job_id = ?",
                (time.time(), job_id),
            )
            add_event(conn, job_id, "cancelled", "cancelled before it started")
        else:
            conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE job_id = ?", (job_id,))
    return job_row(conn, job_id)


def events_after(conn: sqlite3.Connection, job_id: str, last_id: int) -> tuple[list[sqlite3.Row], sqlite3.Row | None]:
    """The job's events newer than ``last_id`` and the job as it is now, read together."""
    events = list(conn.execute("SELECT * FROM events WHERE job_id = ? AND id > ? ORDER BY id", (job_id, last_id)))
    return events, job_row(conn, job_id)
