"""JWTs for API keys, signed with rotating ES256/RS256 keys published as a JWKS
(or, with ``signing_algorithm: HS256``, for development, with a secret shared with
the gateway; the asymmetric keys then still exist but sign nothing).

Signing keys are generated on first start; the private key (PKCS#8 DER) is stored
encrypted by the keyring (purpose ``signing-key:<kid>``), the public key as a JWK.
``kid`` is the RFC 7638 thumbprint of the public key. Rotation marks the active
key superseded (it signs nothing more) and schedules it to leave the JWKS once
every token it signed has expired: ``token_ttl_seconds`` plus a clock-skew margin.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from llmesh.runtime.errors import InvalidArgument
from llmesh.services.security.apikeys import ApiKeyRecord
from llmesh.services.security.keyring import Keyring, StoredCiphertexts
from llmesh.services.security.settings import SecuritySettings
from llmesh.services.security.store import transaction

log = logging.getLogger("llmesh.security.tokens")

ALGORITHMS = ("ES256", "RS256")
STORED = StoredCiphertexts("signing_keys", "kid", "private_ct", "signing-key:")
# Verifiers are expected to allow this much clock skew; retired keys stay published as long.
CLOCK_SKEW_S = 60


@dataclass
class SigningKey:
    kid: str
    algorithm: str
    private_key: Any
    public_jwk: dict[str, str]
    created_at: float
    superseded_at: float | None
    retire_at: float | None

    def published(self, now: float) -> bool:
        return self.retire_at is None or now < self.retire_at


def _generate(algorithm: str) -> Any:
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _public_jwk(algorithm: str, private_key: Any) -> dict[str, str]:
    impl = ECAlgorithm if algorithm == "ES256" else RSAAlgorithm
    jwk: dict[str, str] = impl.to_jwk(private_key.public_key(), as_dict=True)
    required = ("crv", "kty", "x", "y") if algorithm == "ES256" else ("e", "kty", "n")
    thumb = json.dumps({k: jwk[k] for k in required}, sort_keys=True, separators=(",", ":")).encode()
    kid = base64.urlsafe_b64encode(hashlib.sha256(thumb).digest()).rstrip(b"=").decode()
    return {**{k: jwk[k] for k in required}, "kid": kid, "use": "sig", "alg": algorithm}


def check_algorithm(algorithm: str, default: str) -> str:
    """The asymmetric algorithm a signing key is made for (HS256 has no key pair)."""
    algorithm = algorithm or (default if default in ALGORITHMS else ALGORITHMS[0])
    if algorithm not in ALGORITHMS:
        raise InvalidArgument("algorithm", f"must be one of {', '.join(ALGORITHMS)}")
    return algorithm


class TokenIssuer:
    def __init__(self, cfg: SecuritySettings, keyring: Keyring, hs256_secret: bytes | None = None) -> None:
        if cfg.signing_algorithm == "HS256" and hs256_secret is None:
            raise ValueError("signing_algorithm HS256 needs the shared hs256 secret")
        self.cfg = cfg
        self.keyring = keyring
        self._hs256_secret = hs256_secret
        self._keys: dict[str, SigningKey] = {}
        self._active: SigningKey | None = None

    @property
    def active(self) -> SigningKey:
        if self._active is None:
            raise RuntimeError("no signing key loaded")
        return self._active

    # ---- key management (writer connection) --------------------------------
    def load_sync(self, conn: sqlite3.Connection) -> None:
        keys = {}
        for r in conn.execute("SELECT * FROM signing_keys ORDER BY created_at"):
            der = self.keyring.decrypt(r["private_ct"], purpose=f"{STORED.purpose_prefix}{r['kid']}".encode())[0]
            keys[r["kid"]] = SigningKey(
                r["kid"],
                r["algorithm"],
                serialization.load_der_private_key(der, None),
                json.loads(r["public_jwk"]),
                r["created_at"],
                r["superseded_at"],
                r["retire_at"],
            )
        self._keys = keys
        live = [k for k in keys.values() if k.superseded_at is None]
        self._active = max(live, key=lambda k: k.created_at) if live else None
        if self._active is None:
            self.rotate_sync(conn, "")

    def rotate_sync(self, conn: sqlite3.Connection, algorithm: str) -> tuple[SigningKey, SigningKey | None]:
        """A new active key; the previous one is superseded now and retired after the longest token TTL."""
        algorithm = check_algorithm(algorithm, self.cfg.signing_algorithm)
        private_key = _generate(algorithm)
        jwk = _public_jwk(algorithm, private_key)
        kid = jwk["kid"]
        der = private_key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        now = time.time()
        new = SigningKey(kid, algorithm, private_key, jwk, now, None, None)
        old = self._active
        retire_at = now + self.cfg.token_ttl_seconds + CLOCK_SKEW_S
        with transaction(conn):
            conn.execute(
                "INSERT INTO signing_keys(kid, algorithm, private_ct, public_jwk, created_at) VALUES (?, ?, ?, ?, ?)",
                (
                    kid,
                    algorithm,
                    self.keyring.encrypt(der, purpose=f"{STORED.purpose_prefix}{kid}".encode())[0],
                    json.dumps(jwk),
                    now,
                ),
            )
            conn.execute(
                "UPDATE signing_keys SET superseded_at = ?, retire_at = ? WHERE superseded_at IS NULL AND kid != ?",
                (now, retire_at, kid),
            )
        for k in self._keys.values():
            if k.superseded_at is None:
                k.superseded_at, k.retire_at = now, retire_at
        self._keys[kid] = new
        self._active = new
        log.info(
            "signing key rotated",
            extra={"fields": {"kid": kid, "algorithm": algorithm, "previous": old.kid if old else None}},
        )
        return new, old

    # ---- tokens and JWKS (no database) -------------------------------------
    def issue(self, key: ApiKeyRecord, scopes: tuple[str, ...], ttl_seconds: int) -> tuple[str, int, str]:
        """(token, exp, kid). exp ≤ now + token_ttl_seconds and ≤ the key's expiry."""
        now = int(time.time())
        ttl = min(ttl_seconds or self.cfg.token_ttl_seconds, self.cfg.token_ttl_seconds)
        exp = now + ttl
        if key.expires_at is not None:
            exp = min(exp, int(key.expires_at))
        claims = {
            "iss": self.cfg.issuer,
            "aud": self.cfg.audience,
            "sub": key.owner,
            "tenant": key.tenant,
            "scopes": list(scopes),
            "scope": " ".join(scopes),
            "roles": list(key.roles),
            "key_id": key.key_id,
            "jti": secrets.token_hex(16),
            "iat": now,
            "nbf": now,
            "exp": exp,
        }
        if self.cfg.signing_algorithm == "HS256":
            assert self._hs256_secret is not None  # required by __init__ for HS256
            return jwt.encode(claims, self._hs256_secret, algorithm="HS256", headers={"typ": "JWT"}), exp, ""
        sk = self.active
        token = jwt.encode(claims, sk.private_key, algorithm=sk.algorithm, headers={"kid": sk.kid, "typ": "JWT"})
        return token, exp, sk.kid

    def jwks(self, now: float | None = None) -> dict[str, list[dict[str, str]]]:
        now = time.time() if now is None else now
        keys = sorted((k for k in self._keys.values() if k.published(now)), key=lambda k: k.created_at, reverse=True)
        return {"keys": [dict(k.public_jwk) for k in keys]}
