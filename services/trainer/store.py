"""The trainer's durable state (``LLMESH_HOME/trainer/trainer.db``): datasets, the job
queue with progress events, and the adapter registry. Written by the service and by
its worker process (each with its own connection; SQLite serialises the writers)."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from llmesh.runtime.sqlite import Database, connect, transaction

SCHEMA_VERSION = 1
SCHEMA = """
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

TERMINAL = ("succeeded", "failed", "cancelled")


def open_database(path: Path) -> Database:
    return Database(path, SCHEMA, SCHEMA_VERSION)


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
    return conn.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
