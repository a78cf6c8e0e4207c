"""Envelope encryption: a master key file wraps versioned AES-256-GCM data keys.

* ``LLMESH_HOME/security/master.key``: 32 random bytes, created 0600 on first
  start. Losing it loses every secret in the database; the service refuses to
  create a new one while wrapped data keys exist, and refuses to start while group
  or others can read it (``llmesh.runtime.files.read_secret``).
* Data keys ``k1, k2, …`` live in the ``data_keys`` table, each wrapped as
  ``nonce(12) || AES-256-GCM(master, key, aad="llmesh-data-key:k<n>") || tag(16)``.
  Encrypt uses the newest version; every version stays available for Decrypt.
* Ciphertext format::

      L (1 byte) || version (L ASCII bytes, "k1") || nonce (12 bytes) || ciphertext || tag (16 bytes)

  The AES-GCM associated data is ``header || purpose || 0x00 || associated_data``
  where ``header`` is the first 1+L bytes: the version cannot be swapped, and a
  ciphertext made for one purpose ("ext" for the Encrypt RPC, "api-key-secret:<id>"
  and "signing-key:<kid>" for the service's own rows) never decrypts as another.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from llmesh.runtime.files import create_secret, read_secret
from llmesh.services.security.store import transaction

log = logging.getLogger("llmesh.security.keyring")

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
EXTERNAL = b"ext"


class DecryptError(ValueError):
    """The ciphertext is malformed, names an unknown key version, or fails authentication."""


@dataclass(frozen=True)
class StoredCiphertexts:
    """A column of keyring ciphertexts that rotation re-wraps; purpose = prefix + primary key."""

    table: str
    key_column: str
    ct_column: str
    purpose_prefix: str


def version_name(n: int) -> str:
    return f"k{n}"


def parse_header(ciphertext: bytes) -> tuple[str, int, bytes]:
    """(version name, version number, header bytes) of a ciphertext."""
    if len(ciphertext) < 1:
        raise DecryptError("ciphertext is empty")
    n = ciphertext[0]
    header = ciphertext[: 1 + n]
    name = header[1:].decode("ascii", errors="replace")
    if n < 2 or len(ciphertext) < 1 + n + NONCE_BYTES + TAG_BYTES or not name.startswith("k") or not name[1:].isdigit():
        raise DecryptError("ciphertext is malformed (expected L || version || nonce || ct || tag)")
    return name, int(name[1:]), header


def _aad(header: bytes, purpose: bytes, associated_data: bytes) -> bytes:
    return header + purpose + b"\x00" + associated_data


def load_master_key(path: Path, *, may_create: bool) -> bytes:
    """The master key; refused when group/others can read it or it is not 32 bytes."""
    try:
        return read_secret(path, size=KEY_BYTES)
    except FileNotFoundError:
        if not may_create:
            raise RuntimeError(
                f"{path} is missing but the database holds wrapped data keys: restore the master key"
            ) from None
    if create_secret(path, secrets.token_bytes(KEY_BYTES)):  # False: another process created it first
        log.info("created master key", extra={"fields": {"path": str(path)}})
    return read_secret(path, size=KEY_BYTES)


class Keyring:
    def __init__(self, master_path: Path) -> None:
        self.master_path = master_path
        self._master: AESGCM | None = None
        self._keys: dict[int, AESGCM] = {}
        self._current = 0

    @property
    def current_version(self) -> str:
        return version_name(self._current)

    @property
    def versions(self) -> list[str]:
        return [version_name(v) for v in sorted(self._keys)]

    # ---- loading and rotation (writer connection) -------------------------
    def _wrap(self, version: int, key: bytes) -> bytes:
        assert self._master is not None
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + self._master.encrypt(nonce, key, f"llmesh-data-key:{version_name(version)}".encode())

    def _unwrap(self, version: int, wrapped: bytes) -> bytes:
        assert self._master is not None
        try:
            return self._master.decrypt(
                wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], f"llmesh-data-key:{version_name(version)}".encode()
            )
        except InvalidTag:
            raise RuntimeError(
                f"data key {version_name(version)} does not unwrap: {self.master_path} is not "
                "the master key this database was created with"
            ) from None

    def load_sync(self, conn: sqlite3.Connection) -> None:
        rows = conn.execute("SELECT version, wrapped FROM data_keys ORDER BY version").fetchall()
        self._master = AESGCM(load_master_key(self.master_path, may_create=not rows))
        self._keys = {r["version"]: AESGCM(self._unwrap(r["version"], r["wrapped"])) for r in rows}
        self._current = max(self._keys, default=0)
        if not self._keys:
            self.rotate_sync(conn, [])

    def rotate_sync(self, conn: sqlite3.Connection, stored: list[StoredCiphertexts]) -> tuple[str, int]:
        """Adds data key k<n+1> and re-wraps ``stored`` with it, in one transaction."""
        new = self._current + 1
        key = secrets.token_bytes(KEY_BYTES)
        rewrapped = 0
        try:
            with transaction(conn):
                conn.execute(
                    "INSERT INTO data_keys(version, wrapped, created_at) VALUES (?, ?, ?)",
                    (new, self._wrap(new, key), time.time()),
                )
                self._keys[new] = aead = AESGCM(key)  # decryptable at once, used by Encrypt after commit
                for s in stored:
                    rows = conn.execute(f"SELECT {s.key_column} AS k, {s.ct_column} AS ct FROM {s.table}").fetchall()
                    for r in rows:
                        purpose = (s.purpose_prefix + r["k"]).encode()
                        pt, _ = self.decrypt(r["ct"], b"", purpose=purpose)
                        ct = self._encrypt_with(new, aead, pt, b"", purpose)
                        conn.execute(f"UPDATE {s.table} SET {s.ct_column} = ? WHERE {s.key_column} = ?", (ct, r["k"]))
                        rewrapped += 1
        except BaseException:
            self._keys.pop(new, None)
            raise
        self._current = new
        log.info("data key rotated", extra={"fields": {"version": version_name(new), "rewrapped": rewrapped}})
        return version_name(new), rewrapped

    # ---- encryption (pure CPU, no database) -------------------------------
    @staticmethod
    def _encrypt_with(version: int, aead: AESGCM, plaintext: bytes, associated_data: bytes, purpose: bytes) -> bytes:
        name = version_name(version).encode("ascii")
        header = bytes([len(name)]) + name
        nonce = secrets.token_bytes(NONCE_BYTES)
        return header + nonce + aead.encrypt(nonce, plaintext, _aad(header, purpose, associated_data))

    def encrypt(
        self, plaintext: bytes, associated_data: bytes = b"", *, purpose: bytes = EXTERNAL
    ) -> tuple[bytes, str]:
        version = self._current
        return self._encrypt_with(version, self._keys[version], plaintext, associated_data, purpose), version_name(
            version
        )

    def decrypt(
        self, ciphertext: bytes, associated_data: bytes = b"", *, purpose: bytes = EXTERNAL
    ) -> tuple[bytes, str]:
        name, version, header = parse_header(ciphertext)
        aead = self._keys.get(version)
        if aead is None:
            raise DecryptError(f"ciphertext names key version {name}, which this keyring does not hold")
        body = ciphertext[len(header) :]
        try:
            return aead.decrypt(body[:NONCE_BYTES], body[NONCE_BYTES:], _aad(header, purpose, associated_data)), name
        except InvalidTag:
            raise DecryptError(
                "authentication failed: associated_data does not match, or the ciphertext was altered"
            ) from None

    def rewrap(
        self, ciphertext: bytes, associated_data: bytes = b"", *, purpose: bytes = EXTERNAL
    ) -> tuple[bytes, str, str]:
        plaintext, old = self.decrypt(ciphertext, associated_data, purpose=purpose)
        new_ct, new = self.encrypt(plaintext, associated_data, purpose=purpose)
        return new_ct, new, old
