"""JWT verification for the gateway (scope/role rules: ``llmesh.runtime.policy``).

``JwtVerifier.verify(token)`` returns a ``Principal`` or raises ``Unauthenticated`` with
a short reason (never the token). Rules:

* size: tokens over ``max_token_bytes`` are refused before any parsing;
* algorithm: taken from the header only to pick a key, and only if it is in
  ``allowed_algs`` (default ``RS256``, ``ES256``; plus ``HS256`` when an ``hs256_secret``
  is configured). ``none`` is never accepted. HS256 tokens are verified with the
  configured secret only, never with a JWKS key (no RSA-public-key-as-HMAC-secret
  confusion); RS*/ES* tokens are verified only with a JWKS key of the matching type
  (RSA for RS*/PS*, EC with the matching curve for ES*), and ``jwt.decode`` gets
  ``algorithms=[that one alg]``. Symmetric (``oct``) JWKS keys are ignored.
* keys: the JWKS is cached by ``kid``; an unknown ``kid`` triggers one refresh (key
  rotation without restart), at most one refresh per ``min_refresh_interval_s`` (10 s)
  so forged kids cannot cause a refresh storm against the identity provider.
* claims: ``exp``, ``iat``, ``sub``, ``tenant`` are required; ``exp``/``nbf``/``iat``
  are checked with ``leeway_s`` (``iat`` may not be in the future); ``iss`` and ``aud``
  must match.

Principal scopes come from ``scope`` (space separated, RFC 8693) or ``scp``/``scopes``
(string or list); roles from ``roles`` (string or list).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jwt

from llmesh.runtime.errors import Unauthenticated, Unavailable

log = logging.getLogger(__name__)

ASYMMETRIC_DEFAULT = ("RS256", "ES256")
REQUIRED_CLAIMS = ("exp", "iat", "sub", "tenant")
_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
_HMAC_ALGS = frozenset({"HS256", "HS384", "HS512"})
_KNOWN_ALGS = _RSA_ALGS | set(_EC_CURVES) | {"HS256"}


@dataclass(frozen=True)
class Principal:
    subject: str
    tenant: str
    scopes: frozenset[str]
    roles: frozenset[str]
    key_id: str | None  # the signing key (JWT header kid)
    expires_at: float
    # The API key the token was issued for: the gateway binds request signatures to it.
    api_key_id: str | None = None


@dataclass(frozen=True)
class _Key:
    kty: str
    crv: str | None
    alg: str | None  # the JWK's own "alg", when it pins one
    key: Any  # cryptography public key


def _safe(value: object, limit: int = 32) -> str:
    """An attacker-controlled header value, made safe to put in a message."""
    text = value if isinstance(value, str) else type(value).__name__
    text = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return repr(text)


def _str_set(value: object, claim: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return frozenset(value)
    raise Unauthenticated(f"malformed token: claim '{claim}' must be a string or a list of strings")


class JwtVerifier:
    def __init__(
        self,
        issuer: str,
        audience: str,
        *,
        hs256_secret: bytes | None = None,
        jwks_fetcher: Callable[[], Awaitable[str]] | None = None,
        leeway_s: float = 30,
        max_token_bytes: int = 8192,
        allowed_algs: Sequence[str] | None = None,
        min_refresh_interval_s: float = 10.0,
        fetch_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if hs256_secret is not None:
            if len(hs256_secret) < 32:
                raise ValueError("hs256_secret must be at least 32 bytes (RFC 7518 section 3.2)")
            if hs256_secret.lstrip().startswith((b"-----BEGIN", b"ssh-")):
                raise ValueError("hs256_secret looks like a PEM/SSH key; use a random secret")
        if allowed_algs is None:
            allowed_algs = ASYMMETRIC_DEFAULT + (("HS256",) if hs256_secret is not None else ())
        algs = frozenset(allowed_algs)
        if "none" in {a.lower() for a in algs}:
            raise ValueError("alg 'none' can never be allowed")
        unknown = algs - _KNOWN_ALGS
        if unknown:
            raise ValueError(f"unsupported algorithms: {sorted(unknown)}")
        if "HS256" in algs and hs256_secret is None:
            raise ValueError("HS256 allowed but no hs256_secret given")
        if algs - _HMAC_ALGS and jwks_fetcher is None:
            log.info("no jwks_fetcher: asymmetric tokens will be refused")
        self.issuer = issuer
        self.audience = audience
        self.allowed_algs = algs
        self.leeway_s = leeway_s
        self.max_token_bytes = max_token_bytes
        self._secret = hs256_secret
        self._fetch = jwks_fetcher
        self._min_refresh = min_refresh_interval_s
        self._fetch_timeout = fetch_timeout_s
        self._clock = clock
        self._keys: dict[str, _Key] = {}
        self._verified: OrderedDict[str, Principal] = OrderedDict()
        self._loaded = False
        self._last_refresh: float | None = None
        self._lock = asyncio.Lock()

    # ---- JWKS ----------------------------------------------------------------------

    @staticmethod
    def parse_jwks(text: str) -> dict[str, _Key]:
        doc = json.loads(text)
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise ValueError("JWKS must be an object with a 'keys' list")
        keys: dict[str, _Key] = {}
        for jwk in doc["keys"]:
            if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str):
                continue
            kty = jwk.get("kty")
            if kty not in ("RSA", "EC") or jwk.get("use", "sig") != "sig":
                continue  # never use symmetric (oct) or encryption keys to verify
            alg = jwk.get("alg") if isinstance(jwk.get("alg"), str) else None
            try:
                key = jwt.PyJWK(jwk).key
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as e:
                log.warning("skipping unusable JWKS key %s: %s", _safe(jwk["kid"]), e)
                continue
            keys[jwk["kid"]] = _Key(kty=kty, crv=jwk.get("crv"), alg=alg, key=key)
        return keys

    async def refresh(self, *, force: bool = False) -> bool:
        """Fetch the JWKS (at most once per ``min_refresh_interval_s`` unless ``force``).
        True when a fetch happened and succeeded."""
        if self._fetch is None:
            return False
        async with self._lock:
            now = self._clock()
            if not force and self._last_refresh is not None and now - self._last_refresh < self._min_refresh:
                return False
            self._last_refresh = now
            try:
                async with asyncio.timeout(self._fetch_timeout):
                    text = await self._fetch()
                keys = self.parse_jwks(text)
            except Exception as e:  # network, JSON, shape: keep the old keys
                log.warning("JWKS refresh failed: %s", e)
                return False
            if set(keys) != set(self._keys):
                self._verified.clear()  # a retired (or revoked) key must not live on in the cache
            self._keys = keys
            self._loaded = True
            return True

    async def _key_for(self, kid: str) -> _Key:
        key = self._keys.get(kid)
        if key is None:
            await self.refresh()
            key = self._keys.get(kid)
        if key is None:
            if not self._loaded:
                wait = self._min_refresh
                if self._last_refresh is not None:
                    wait = max(0.0, self._min_refresh - (self._clock() - self._last_refresh))
                raise Unavailable("signing keys (JWKS) unavailable", retry_after_s=max(1.0, wait))
            raise Unauthenticated(f"unknown signing key id {_safe(kid)}")
        return key

    # ---- verification ---------------------------------------------------------------

    async def verify(self, token: str) -> Principal:
        # Clients reuse a token for many calls: a verified token is remembered until
        # it expires (bounded LRU), so the signature check runs once per token.
        cached = self._verified.get(token) if isinstance(token, str) else None
        if cached is not None and cached.expires_at > time.time():
            self._verified.move_to_end(token)
            return cached
        principal = await self._verify(token)
        self._verified[token] = principal
        if len(self._verified) > self.VERIFIED_CACHE:
            self._verified.popitem(last=False)
        return principal

    VERIFIED_CACHE = 10_000

    async def _verify(self, token: str) -> Principal:
        if not isinstance(token, str) or not token:
            raise Unauthenticated("missing bearer token")
        if len(token) > self.max_token_bytes or len(token.encode("utf-8", "replace")) > self.max_token_bytes:
            raise Unauthenticated(f"token too large (limit {self.max_token_bytes} bytes)")
        if token[:7].lower() == "bearer ":
            token = token[7:].strip()
        if token.count(".") != 2:
            raise Unauthenticated("malformed token: expected header.payload.signature")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("malformed token: unreadable header") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise Unauthenticated("unsigned token (alg none) refused")
        if alg not in self.allowed_algs:
            raise Unauthenticated(f"token algorithm {_safe(alg)} not allowed")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise Unauthenticated("malformed token: kid must be a string")

        if alg in _HMAC_ALGS:
            key: Any = self._secret  # never a JWKS key: no RSA-public-key-as-HMAC-secret confusion
        else:
            if kid is None:
                raise Unauthenticated("token header has no kid")
            k = await self._key_for(kid)
            if alg in _RSA_ALGS:
                ok = k.kty == "RSA"
            else:
                ok = k.kty == "EC" and k.crv == _EC_CURVES[alg]
            if not ok or (k.alg is not None and k.alg != alg):
                raise Unauthenticated(f"token algorithm {alg} does not match key {_safe(kid)}")
            key = k.key

        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": list(REQUIRED_CLAIMS), "verify_iat": True},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired") from None
        except jwt.ImmatureSignatureError as e:
            what = "iat" if "iat" in str(e) else "nbf"
            raise Unauthenticated(f"token not yet valid ({what} in the future)") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("token issuer not accepted") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("token audience not accepted") from None
        except jwt.MissingRequiredClaimError as e:
            raise Unauthenticated(f"token lacks required claim '{e.claim}'") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("bad token signature") from None
        except jwt.InvalidAlgorithmError:
            raise Unauthenticated(f"token algorithm {_safe(alg)} not allowed") from None
        except (jwt.InvalidIssuedAtError, jwt.exceptions.InvalidSubjectError, jwt.DecodeError):
            raise Unauthenticated("malformed token") from None
        except jwt.PyJWTError:
            raise Unauthenticated("invalid token") from None

        sub, tenant = claims.get("sub"), claims.get("tenant")
        if not isinstance(sub, str) or not sub:
            raise Unauthenticated("malformed token: 'sub' must be a non-empty string")
        if not isinstance(tenant, str) or not tenant:
            raise Unauthenticated("malformed token: 'tenant' must be a non-empty string")
        scopes = _str_set(claims.get("scope"), "scope") | _str_set(claims.get("scp"), "scp")
        scopes |= _str_set(claims.get("scopes"), "scopes")
        return Principal(
            subject=sub,
            tenant=tenant,
            scopes=scopes,
            roles=_str_set(claims.get("roles"), "roles"),
            key_id=kid,
            expires_at=float(claims["exp"]),
            api_key_id=claims["key_id"] if isinstance(claims.get("key_id"), str) else None,
        )
