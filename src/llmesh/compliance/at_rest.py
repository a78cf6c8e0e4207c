"""Encryption at rest: the security service's keys and secret columns (through the
service's own read-only state reader) and whether Redis writes chat memory to disk."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import redis

from llmesh.compliance.addresses import display_url
from llmesh.compliance.findings import Check, Finding, make_check
from llmesh.compliance.probes import mode, private_file, redis_config, security_dir
from llmesh.config import MeshConfig
from llmesh.services.security.state_reader import DATABASE, MASTER_KEY, SecurityState

# Column names that say "a secret lives here".
SECRET_WORDS = ("secret", "private", "password", "passwd", "token")


def plaintext_secret_columns(state: SecurityState) -> list[str]:
    """Columns whose name says secret/private/password/token but that the keyring does not
    encrypt: where a plaintext secret would be."""
    encrypted = state.encrypted_columns()
    return [
        f"{t}.{c}" for t, c in state.columns() if any(w in c.lower() for w in SECRET_WORDS) and (t, c) not in encrypted
    ]


def ciphertext_findings(state: SecurityState) -> list[Finding]:
    out: list[Finding] = []
    for col in state.ciphertext_columns():
        if col.bad:
            out.append(
                (
                    "fail",
                    f"{col.column}: {len(col.bad)} of {col.values} value(s) are not AES-256-GCM keyring "
                    f"ciphertexts: {', '.join(col.bad[:3])}",
                )
            )
        else:
            keys = ", ".join(col.data_keys) or "none used yet"
            out.append(
                (
                    "pass",
                    f"{col.column}: {col.values} value(s), all AES-256-GCM keyring ciphertexts (data keys: {keys})",
                )
            )
    return out


def db_exposure_findings(folder: Path) -> list[Finding]:
    """The database holds key metadata and the audit log in clear: only file permissions
    keep other local users out of it (a 0644 file in a 0700 folder is still private)."""
    if not folder.is_dir() or not mode(folder) & 0o077:
        return []
    db = folder / DATABASE
    readable = db.is_file() and mode(db) & 0o077
    what = (
        f"and {db.name} has mode {mode(db):04o}: key metadata and audit records are readable by other users"
        if readable
        else "other users can enter it"
    )
    # The service asks for 0700, but whichever process creates the folder first wins.
    return [("warn", f"{folder} has mode {mode(folder):04o} {what}")]


def security_store_findings(cfg: MeshConfig) -> list[Finding]:
    """The security service's state on disk: master key, data keys, secret columns."""
    folder = security_dir(cfg)
    out = [private_file(folder / MASTER_KEY, "keyring master key"), *db_exposure_findings(folder)]
    try:
        state = SecurityState.open(folder)
    except sqlite3.Error as e:
        return [*out, ("fail", f"{folder / DATABASE}: cannot open read-only: {e}")]
    if state is None:
        return [*out, ("fail", f"{folder / DATABASE} is missing (the security service never started here)")]
    with state:
        try:
            n_keys = len(state.data_key_names())
            out.append(("pass", f"{DATABASE} (opened read-only): {n_keys} data key(s) wrapped by the master key"))
            plain = plaintext_secret_columns(state)
            if plain:
                out.append(
                    ("fail", f"columns that look like secrets but are not keyring-encrypted: {', '.join(plain)}")
                )
            else:
                out.append(("pass", "no plaintext secret columns (schema of every table checked)"))
            out += ciphertext_findings(state)
        except sqlite3.Error as e:
            out.append(("fail", f"{DATABASE}: {e}"))
    out.append(("pass", f"{DATABASE} itself is not encrypted: key metadata and audit records rely on file permissions"))
    return out


def redis_persistence_finding(url: str) -> Finding:
    """Chat memory reaches disk only through RDB snapshots or the AOF."""
    where = f"Redis at {display_url(url)} (chat memory)"
    try:
        conf = redis_config(url, "save", "appendonly")
    except redis.RedisError as e:
        return "fail", f"{where} unreachable or CONFIG refused: {e}"
    save, aof = conf.get("save", ""), conf.get("appendonly", "no")
    seen = f"CONFIG GET save={save!r}, appendonly={aof!r}"
    if not save.strip() and aof == "no":
        return "pass", f"{where}: persistence off ({seen}): conversations never reach disk"
    return "warn", f"{where}: persistence on ({seen}): conversations are written to disk unencrypted"


def encryption_at_rest(cfg: MeshConfig) -> Check:
    findings = [*security_store_findings(cfg), redis_persistence_finding(cfg.inference.peers.redis)]
    return make_check("encryption_at_rest", "Encryption at rest", findings)
