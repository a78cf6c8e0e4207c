"""The adapter registry: every adapter is ``name@vN`` with its lineage; aliases
(``faq@live``) point at versions, with a history for rollback.

Publishing is a directory rename into the shared adapter store
(``LLMESH_HOME/adapters/name@vN``, the folder every Triton replica loads adapters
from, lazily, by name) made inside the database transaction that assigns the
version, then announced by rewriting ``adapters/registry.json`` atomically: the
inference services resolve ``name`` / ``name@alias`` from it on the next request.
No Triton restart, no reload of the base model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmesh.adapter_store import ANNOUNCEMENT, DEFAULT_ALIAS, PROMPT_FORMATS, folder
from llmesh.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from llmesh.runtime.files import publish_dir, write_atomic
from llmesh.runtime.sqlite import transaction

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
ALIAS = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class Ref:
    name: str
    version: int | None = None
    alias: str | None = None


def check_name(name: str, field: str = "adapter_name") -> str:
    if not NAME.match(name):
        raise InvalidArgument(field, "must match [a-z0-9][a-z0-9_-]{0,63}")
    return name


def parse_ref(ref: str, field: str = "ref") -> Ref:
    """``name``, ``name@vN`` or ``name@alias``."""
    name, at, tag = ref.partition("@")
    check_name(name, field)
    if not at:
        return Ref(name)
    if re.fullmatch(r"v[0-9]{1,6}", tag):
        return Ref(name, version=int(tag[1:]))
    if ALIAS.match(tag) and not re.fullmatch(r"v[0-9]*", tag):
        return Ref(name, alias=tag)
    raise InvalidArgument(field, "must be name, name@vN or name@alias")


def model_fingerprint(path: Path) -> str:
    """Identifies a base model folder: its config and, per weight file, the name, size
    and hashes of the first and last MiB (a full hash of multi-GB weights would take
    minutes at every start; a different model differs in these)."""
    h = hashlib.sha256()
    h.update((path / "config.json").read_bytes())
    for f in sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()


# ---- writes (each in one transaction, then announced) ---------------------------------


def register(
    conn: sqlite3.Connection,
    store: Path,
    staged: Path,
    *,
    name: str,
    job_id: str,
    base_model: str,
    base_sha: str,
    dataset_id: str,
    hyperparameters: dict[str, Any],
    base_eval: dict[str, Any],
    tuned_eval: dict[str, Any],
    min_improvement: float,
    created_by: str,
    prompt_format: str = "chat",
) -> int:
    """Publish the adapter in ``staged`` as the next version of ``name``; ``prompt_format``
    ("chat" or "raw") is what it was trained with, announced for serving."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {prompt_format!r}")
    store.mkdir(parents=True, exist_ok=True)
    with transaction(conn):
        row = conn.execute("SELECT COALESCE(MAX(version), 0) AS v FROM adapters WHERE name = ?", (name,)).fetchone()
        version = int(row["v"]) + 1
        final = store / folder(name, version)
        # A folder left by a crash between rename and commit is not registered: replace it.
        publish_dir(staged, final, replace=True)
        try:
            conn.execute(
                "INSERT INTO adapters(name, version, job_id, base_model, base_model_sha256, dataset_id, hyperparameters, "
                "base_eval, tuned_eval, min_improvement, created_by, created_at, prompt_format) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    name,
                    version,
                    job_id,
                    base_model,
                    base_sha,
                    dataset_id,
                    json.dumps(hyperparameters),
                    json.dumps(base_eval),
                    json.dumps(tuned_eval),
                    min_improvement,
                    created_by,
                    time.time(),
                    prompt_format,
                ),
            )
        except BaseException:
            os.rename(final, staged)
            raise
    announce(conn, store)
    return version


def _check_alias(alias: str) -> str:
    alias = alias or DEFAULT_ALIAS
    if not ALIAS.match(alias) or re.fullmatch(r"v[0-9]*", alias):
        raise InvalidArgument("alias", "must match [a-z][a-z0-9_-]{0,31} and not look like a version")
    return alias


def _check_base(row: sqlite3.Row, served_base_sha: str) -> None:
    if row["base_model_sha256"] != served_base_sha:
        raise FailedPrecondition(
            f"{folder(row['name'], row['version'])} was trained on another base model "
            f"({row['base_model']}) than the one served"
        )


def promote(conn: sqlite3.Connection, store: Path, ref: str, alias: str, served_base_sha: str) -> tuple[str, int]:
    r = parse_ref(ref)
    alias = _check_alias(alias)
    with transaction(conn):
        name, version = _resolve(conn, r)
        row = _row(conn, name, version)
        assert row is not None
        _check_base(row, served_base_sha)
        base, tuned = json.loads(row["base_eval"]), json.loads(row["tuned_eval"])
        gain = tuned.get("rouge_l", 0.0) - base.get("rouge_l", 0.0)
        if row["min_improvement"] > 0 and gain < row["min_improvement"]:  # a margin the job asked for
            raise FailedPrecondition(
                f"{folder(name, version)} improves ROUGE-L by {gain:.3f} over the base model; "
                f"its job requires {row['min_improvement']:.3f}"
            )
        current = conn.execute(
            "SELECT version, history FROM aliases WHERE name = ? AND alias = ?", (name, alias)
        ).fetchone()
        if current is None:
            conn.execute("INSERT INTO aliases(name, alias, version) VALUES (?, ?, ?)", (name, alias, version))
        elif current["version"] != version:
            history = json.loads(current["history"]) + [current["version"]]
            conn.execute(
                "UPDATE aliases SET version = ?, history = ? WHERE name = ? AND alias = ?",
                (version, json.dumps(history[-50:]), name, alias),
            )
    announce(conn, store)
    return name, version


def set_split(
    conn: sqlite3.Connection, store: Path, name: str, alias: str, arms: list[tuple[int, float]], served_base_sha: str
) -> list[tuple[int, float]]:
    """Route ``name@alias`` between versions by weight (no arms: remove the split)."""
    check_name(name, "name")
    alias = _check_alias(alias)
    if len({v for v, _ in arms}) != len(arms):
        raise InvalidArgument("arms", "each version may appear once")
    for i, (_version, weight) in enumerate(arms):
        if not (weight > 0 and math.isfinite(weight)):
            raise InvalidArgument(f"arms[{i}].weight", "must be a positive number")
    with transaction(conn):
        if not arms:
            conn.execute("DELETE FROM splits WHERE name = ? AND alias = ?", (name, alias))
        else:
            for version, _ in arms:
                row = _row(conn, name, version)
                assert row is not None
                _check_base(row, served_base_sha)
            conn.execute(
                "INSERT INTO splits(name, alias, arms) VALUES (?, ?, ?) "
                "ON CONFLICT(name, alias) DO UPDATE SET arms = excluded.arms",
                (name, alias, json.dumps([[v, w] for v, w in arms])),
            )
    announce(conn, store)
    return arms


def rollback(conn: sqlite3.Connection, store: Path, name: str, alias: str) -> tuple[str, int]:
    check_name(name, "name")
    alias = alias or DEFAULT_ALIAS
    with transaction(conn):
        current = conn.execute(
            "SELECT version, history FROM aliases WHERE name = ? AND alias = ?", (name, alias)
        ).fetchone()
        if current is None:
            raise NotFound("adapter alias", f"{name}@{alias}")
        history = json.loads(current["history"])
        if not history:
            raise FailedPrecondition(f"{name}@{alias} has no earlier version to roll back to")
        version = history.pop()
        conn.execute(
            "UPDATE aliases SET version = ?, history = ? WHERE name = ? AND alias = ?",
            (version, json.dumps(history), name, alias),
        )
    announce(conn, store)
    return name, version


def delete(conn: sqlite3.Connection, store: Path, ref: str) -> bool:
    r = parse_ref(ref)
    if r.version is None:
        raise InvalidArgument("ref", "name a version: name@vN")
    with transaction(conn):
        if _row(conn, r.name, r.version, missing_ok=True) is None:
            return False
        pointing = [
            a["alias"]
            for a in conn.execute("SELECT alias FROM aliases WHERE name = ? AND version = ?", (r.name, r.version))
        ]
        for split in conn.execute("SELECT alias, arms FROM splits WHERE name = ?", (r.name,)):
            if any(v == r.version for v, _ in json.loads(split["arms"])):
                pointing.append(f"{split['alias']} (split)")
        if pointing:
            raise FailedPrecondition(
                f"{folder(r.name, r.version)} is {', '.join(f'{r.name}@{a}' for a in pointing)}: "
                "point the alias elsewhere first"
            )
        conn.execute("DELETE FROM adapters WHERE name = ? AND version = ?", (r.name, r.version))
        target = store / folder(r.name, r.version)
        if target.exists():  # out of the store first (atomic), then removed
            trash = store / f".deleted-{uuid.uuid4().hex}"
            os.rename(target, trash)
            shutil.rmtree(trash, ignore_errors=True)
    announce(conn, store)
    return True


def announce(conn: sqlite3.Connection, store: Path) -> None:
    """Rewrite ``registry.json`` (atomically) from the database."""
    doc: dict[str, dict[str, Any]] = {}
    for row in conn.execute("SELECT name, version, prompt_format FROM adapters ORDER BY name, version"):
        entry = doc.setdefault(row["name"], {"versions": [], "aliases": {}})
        entry["versions"].append(row["version"])
        if row["prompt_format"] != "chat":  # the default: only the exceptions are announced
            entry.setdefault("prompt_formats", {})[str(row["version"])] = row["prompt_format"]
    for row in conn.execute("SELECT name, alias, version FROM aliases"):
        doc.setdefault(row["name"], {"versions": [], "aliases": {}})["aliases"][row["alias"]] = row["version"]
    for row in conn.execute("SELECT name, alias, arms FROM splits"):
        doc.setdefault(row["name"], {"versions": [], "aliases": {}}).setdefault("splits", {})[row["alias"]] = (
            json.loads(row["arms"])
        )
    write_atomic(store / ANNOUNCEMENT, json.dumps({"adapters": doc}, sort_keys=True))


# ---- reads --------------------------------------------------------------------------


def _row(conn: sqlite3.Connection, name: str, version: int, missing_ok: bool = False) -> sqlite3.Row | None:
    row = conn.execute("SELECT * FROM adapters WHERE name = ? AND version = ?", (name, version)).fetchone()
    if row is None and not missing_ok:
        raise NotFound("adapter", folder(name, version))
    return row  # type: ignore[no-any-return]  # sqlite3's fetchone() is untyped; the row factory makes it a Row


def _resolve(conn: sqlite3.Connection, r: Ref) -> tuple[str, int]:
    if r.version is not None:
        _row(conn, r.name, r.version)
        return r.name, r.version
    if r.alias is not None:
        row = conn.execute("SELECT version FROM aliases WHERE name = ? AND alias = ?", (r.name, r.alias)).fetchone()
        if row is None:
            raise NotFound("adapter alias", f"{r.name}@{r.alias}")
        return r.name, int(row["version"])
    row = conn.execute("SELECT version FROM aliases WHERE name = ? AND alias = ?", (r.name, DEFAULT_ALIAS)).fetchone()
    if row is None:
        row = conn.execute("SELECT MAX(version) AS version FROM adapters WHERE name = ?", (r.name,)).fetchone()
        if row is None or row["version"] is None:
            raise NotFound("adapter", r.name)
    return r.name, int(row["version"])


def resolve(conn: sqlite3.Connection, ref: str) -> sqlite3.Row:
    name, version = _resolve(conn, parse_ref(ref))
    row = _row(conn, name, version)
    assert row is not None
    return row


def aliases_of(conn: sqlite3.Connection, name: str, version: int) -> list[str]:
    return [
        a["alias"]
        for a in conn.execute(
            "SELECT alias FROM aliases WHERE name = ? AND version = ? ORDER BY alias", (name, version)
        )
    ]


def rows(conn: sqlite3.Connection, name: str = "") -> list[sqlite3.Row]:
    if name:
        return list(conn.execute("SELECT * FROM adapters WHERE name = ? ORDER BY version", (check_name(name, "name"),)))
    return list(conn.execute("SELECT * FROM adapters ORDER BY name, version"))
