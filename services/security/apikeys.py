"""API keys: ``lk_<32 hex>`` ids with a 32-byte url-safe secret shown once.

The secret is stored encrypted by the keyring (purpose ``api-key-secret:<id>``)
because the gateway needs it back in clear to verify HMAC request signatures
(``GetApiKeySecret``); verification compares in constant time.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from llmesh.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from llmesh.services.security.keyring import Keyring, StoredCiphertexts
from llmesh.services.security.store import transaction

KEY_ID = re.compile(r"^lk_[0-9a-f]{32}$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:+-]{0,127}$")
# "service:action", "service:*", "service:sub.action", or a bare word ("admin").
SCOPE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}(:[a-z0-9_.*-]{1,64}){0,2}$")
ROLE = re.compile(r"^[a-z][a-z0-9_.:-]{0,63}$")
MAX_TTL_DAYS = 3650
MAX_ITEMS = 64
DEFAULT_TENANT = "default"
STORED = StoredCiphertexts("api_keys", "key_id", "secret_ct", "api-key-secret:")
# Compared against when the key id is unknown, so timing does not tell the two apart.
_DUMMY = secrets.token_urlsafe(32)


@dataclass(frozen=True)
class ApiKeyRecord:
    key_id: str
    owner: str
    tenant: str
    scopes: tuple[str, ...]
    roles: tuple[str, ...]
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    rotated_at: float | None
    secret_ct: bytes = field(repr=False)

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and (now or time.time()) >= self.expires_at

    def check_usable(self, now: float | None = None) -> None:
        if self.revoked:
            raise FailedPrecondition(f"API key {self.key_id} is revoked", metadata={"key_id": self.key_id})
        if self.expired(now):
            raise FailedPrecondition(f"API key {self.key_id} has expired", metadata={"key_id": self.key_id})


def _row(r: sqlite3.Row) -> ApiKeyRecord:
    return ApiKeyRecord(
        r["key_id"],
        r["owner"],
        r["tenant"],
        tuple(json.loads(r["scopes"])),
        tuple(json.loads(r["roles"])),
        r["created_at"],
        r["expires_at"],
        r["revoked_at"],
        r["rotated_at"],
        r["secret_ct"],
    )


def check_key_id(key_id: str, field_name: str = "key_id") -> str:
    if not key_id:
        raise InvalidArgument(field_name, "must not be empty")
    if not KEY_ID.match(key_id):
        raise InvalidArgument(field_name, "must be 'lk_' followed by 32 lowercase hex digits")
    return key_id


def check_name(value: str, field_name: str, *, required: bool) -> str:
    if not value:
        if required:
            raise InvalidArgument(field_name, "must not be empty")
        return value
    if not NAME.match(value):
        raise InvalidArgument(
            field_name, "must be 1-128 characters of [A-Za-z0-9._@:+-], starting with a letter or digit"
        )
    return value


def check_list(values: Iterable[str], field_name: str, pattern: re.Pattern[str], what: str) -> tuple[str, ...]:
    out = []
    for i, v in enumerate(values):
        if not pattern.match(v):
            raise InvalidArgument(f"{field_name}[{i}]", f"'{v[:80]}' is not a valid {what}")
        out.append(v)
    if len(out) > MAX_ITEMS:
        raise InvalidArgument(field_name, f"at most {MAX_ITEMS} entries")
    return tuple(sorted(set(out)))


class ApiKeys:
    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring

    def _encrypt_secret(self, key_id: str, secret: str) -> bytes:
        return self.keyring.encrypt(secret.encode(), purpose=f"{STORED.purpose_prefix}{key_id}".encode())[0]

    def _decrypt_secret(self, rec: ApiKeyRecord) -> str:
        return self.keyring.decrypt(rec.secret_ct, purpose=f"{STORED.purpose_prefix}{rec.key_id}".encode())[0].decode()

    @staticmethod
    def _get(conn: sqlite3.Connection, key_id: str) -> ApiKeyRecord | None:
        r = conn.execute("SELECT * FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
        return _row(r) if r else None

    def get_sync(self, conn: sqlite3.Connection, key_id: str) -> ApiKeyRecord:
        rec = self._get(conn, check_key_id(key_id))
        if rec is None:
            raise NotFound("api_key", key_id)
        return rec

    def create_sync(
        self,
        conn: sqlite3.Connection,
        owner: str,
        tenant: str,
        scopes: Iterable[str],
        roles: Iterable[str],
        ttl_days: int,
    ) -> tuple[ApiKeyRecord, str]:
        owner = check_name(owner, "owner", required=True)
        tenant = check_name(tenant, "tenant", required=False) or DEFAULT_TENANT
        scope_t = check_list(scopes, "scopes", SCOPE, "scope (e.g. 'inference:generate')")
        role_t = check_list(roles, "roles", ROLE, "role")
        if not scope_t and not role_t:
            raise InvalidArgument("scopes", "a key needs at least one scope or role")
        if ttl_days > MAX_TTL_DAYS:
            raise InvalidArgument("ttl_days", f"at most {MAX_TTL_DAYS} (0: no expiry)")
        now = time.time()
        key_id = "lk_" + secrets.token_hex(16)
        secret = secrets.token_urlsafe(32)
        rec = ApiKeyRecord(
            key_id,
            owner,
            tenant,
            scope_t,
            role_t,
            now,
            now + ttl_days * 86400 if ttl_days else None,
            None,
            None,
            self._encrypt_secret(key_id, secret),
        )
        with transaction(conn):
            conn.execute(
                "INSERT INTO api_keys(key_id, owner, tenant, scopes, roles, secret_ct, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key_id, owner, tenant, json.dumps(scope_t), json.dumps(role_t), rec.secret_ct, now, rec.expires_at),
            )
        return rec, secret

    def list_sync(self, conn: sqlite3.Connection, owner: str, tenant: str) -> list[ApiKeyRecord]:
        check_name(owner, "owner", required=False)
        check_name(tenant, "tenant", required=False)
        q, args = "SELECT * FROM api_keys WHERE 1=1", list[str]()
        if owner:
            q, args = q + " AND owner = ?", [*args, owner]
        if tenant:
            q, args = q + " AND tenant = ?", [*args, tenant]
        return [_row(r) for r in conn.execute(q + " ORDER BY created_at, key_id", args)]

    def revoke_sync(self, conn: sqlite3.Connection, key_id: str) -> ApiKeyRecord:
        with transaction(conn):
            rec = self.get_sync(conn, key_id)
            if rec.revoked:
                return rec
            conn.execute("UPDATE api_keys SET revoked_at = ? WHERE key_id = ?", (time.time(), key_id))
            return self.get_sync(conn, key_id)

    def rotate_sync(self, conn: sqlite3.Connection, key_id: str) -> tuple[ApiKeyRecord, str]:
        with transaction(conn):
            self.get_sync(conn, key_id).check_usable()
            secret = secrets.token_urlsafe(32)
            conn.execute(
                "UPDATE api_keys SET secret_ct = ?, rotated_at = ? WHERE key_id = ?",
                (self._encrypt_secret(key_id, secret), time.time(), key_id),
            )
            return self.get_sync(conn, key_id), secret

    def secret_sync(self, conn: sqlite3.Connection, key_id: str) -> tuple[ApiKeyRecord, str]:
        rec = self.get_sync(conn, key_id)
        rec.check_usable()
        return rec, self._decrypt_secret(rec)

    def authenticate_sync(self, conn: sqlite3.Connection, key_id: str, secret: str) -> ApiKeyRecord:
        """The key, if ``secret`` is its secret and it is usable. Unknown id and wrong
        secret are the same UNAUTHENTICATED; revoked/expired is checked only after
        the secret matched, so the state of a key is not told to strangers."""
        check_key_id(key_id)
        if not secret:
            raise InvalidArgument("secret", "must not be empty")
        rec = self._get(conn, key_id)
        expected = self._decrypt_secret(rec) if rec else _DUMMY
        ok = hmac.compare_digest(secret.encode(), expected.encode())
        if rec is None or not ok:
            raise Unauthenticated("invalid API key id or secret")
        rec.check_usable()
        return rec


def _covered(scope: str, held: tuple[str, ...]) -> bool:
    """Exact match, or a held "prefix:*" covers "prefix:anything"."""
    return scope in held or any(h.endswith(":*") and scope.startswith(h[:-1]) and scope != h[:-1] for h in held)


def granted_scopes(rec: ApiKeyRecord, requested: Iterable[str]) -> tuple[str, ...]:
    """Requested scopes (all of the key's when empty); PERMISSION_DENIED for any the key lacks."""
    req = check_list(requested, "scopes", SCOPE, "scope")
    if not req:
        return rec.scopes
    missing = [s for s in req if not _covered(s, rec.scopes)]
    if missing:
        raise PermissionDenied(
            f"API key {rec.key_id} does not carry scope(s) {', '.join(missing)}",
            metadata={"key_id": rec.key_id, "missing_scopes": " ".join(missing)},
        )
    return req
