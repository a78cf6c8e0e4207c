"""JWT verification: valid RS256/ES256/HS256, every claim check, alg none and algorithm
confusion, JWKS rotation with a rate-limited refresh, oversize/garbage tokens, and scope
authorization. Keys are generated at test time."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from llmesh.runtime.errors import PermissionDenied, Unauthenticated, Unavailable
from llmesh.runtime.policy import authorize, has_scope
from llmesh.services.gateway.authn import JwtVerifier, Principal

ISS = "https://id.llmesh.test"
AUD = "llmesh-gateway"
HS_SECRET = b"h" * 40


def _jwk(public_key: Any, kid: str, alg_cls: Any) -> dict[str, Any]:
    d: dict[str, Any] = alg_cls.to_jwk(public_key, as_dict=True)
    d.update(kid=kid, use="sig")
    return d


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    rsa1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec1 = ec.generate_private_key(ec.SECP256R1())
    return {"rsa1": rsa1, "rsa2": rsa2, "ec1": ec1}


class Jwks:
    """A mutable JWKS endpoint that counts fetches."""

    def __init__(self, keys: dict[str, Any], kids: list[str]) -> None:
        self.all = keys
        self.kids = kids
        self.fetches = 0
        self.fail = False

    async def __call__(self) -> str:
        self.fetches += 1
        if self.fail:
            raise ConnectionError("idp down")
        out = []
        for kid in self.kids:
            k = self.all[kid]
            out.append(_jwk(k.public_key(), kid, ECAlgorithm if kid.startswith("ec") else RSAAlgorithm))
        return json.dumps({"keys": out})


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    c: dict[str, Any] = {
        "iss": ISS,
        "aud": AUD,
        "sub": "user-1",
        "tenant": "acme",
        "iat": now,
        "exp": now + 300,
        "scope": "inference:generate embed:read",
        "roles": ["dev"],
    }
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def token(keys: dict[str, Any], kid: str, alg: str, **over: Any) -> str:
    return jwt.encode(claims(**over), keys[kid], algorithm=alg, headers={"kid": kid})


@pytest.fixture
def jwks(keys: dict[str, Any]) -> Jwks:
    return Jwks(keys, ["rsa1", "ec1"])


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def verifier(jwks: Jwks, clock: Clock) -> JwtVerifier:
    return JwtVerifier(ISS, AUD, hs256_secret=HS_SECRET, jwks_fetcher=jwks, clock=clock)


@pytest.fixture
def asym_verifier(jwks: Jwks, clock: Clock) -> JwtVerifier:
    return JwtVerifier(ISS, AUD, jwks_fetcher=jwks, clock=clock)


async def refused(v: JwtVerifier, tok: str, match: str) -> str:
    with pytest.raises(Unauthenticated) as e:
        await v.verify(tok)
    msg = e.value.message
    assert match in msg, msg
    if len(tok) > 20:
        sig = tok.split(".")[-1]
        assert tok not in msg and (len(sig) < 8 or sig not in msg)  # never leak the token
    return msg


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    mac = hmac.new(key, signing_input.encode(), hashlib.sha256).digest() if key is not None else b""
    return f"{signing_input}.{_b64(mac)}"


# ---- valid tokens ------------------------------------------------------------------------


async def test_valid_rs256(verifier: JwtVerifier, keys: dict[str, Any]) -> None:
    exp = int(time.time()) + 100
    p = await verifier.verify(token(keys, "rsa1", "RS256", exp=exp))
    assert p == Principal(
        subject="user-1",
        tenant="acme",
        scopes=frozenset({"inference:generate", "embed:read"}),
        roles=frozenset({"dev"}),
        key_id="rsa1",
        expires_at=float(exp),
    )


async def test_valid_es256(verifier: JwtVerifier, keys: dict[str, Any]) -> None:
    p = await verifier.verify(token(keys, "ec1", "ES256", scope=None, scp=["a", "b"]))
    assert p.key_id == "ec1" and p.scopes == {"a", "b"}


async def test_valid_hs256(verifier: JwtVerifier) -> None:
    tok = jwt.encode(claims(roles="admin ops"), HS_SECRET, algorithm="HS256")
    p = await verifier.verify("Bearer " + tok)
    assert p.key_id is None and p.roles == {"admin", "ops"} and p.tenant == "acme"


async def test_jwks_fetched_once_and_cached(
    verifier: JwtVerifier, jwks: Jwks, keys: dict[str, Any], clock: Clock
) -> None:
    for _ in range(5):
        await verifier.verify(token(keys, "rsa1", "RS256"))
    clock.t += 100
    await verifier.verify(token(keys, "ec1", "ES256"))
    assert jwks.fetches == 1


async def test_leeway(verifier: JwtVerifier, keys: dict[str, Any]) -> None:
    now = int(time.time())
    await verifier.verify(token(keys, "rsa1", "RS256", exp=now - 10, iat=now - 100, nbf=now + 10))


# ---- claim checks --------------------------------------------------------------------------


async def test_expired(verifier: JwtVerifier, keys: dict[str, Any]) -> None:
    now = int(time.time())
    await refused(verifier, token(keys, "rsa1", "RS256", exp=now - 60, iat=now - 600), "token expired")


async def test_nbf_future(verifier: JwtVerifier, keys: dict[str, Any]) -> None:
    await refused(verifier, token(keys, "rsa1", "RS256", nbf=int(time.time()) + 120), "not yet valid (nbf")


async def test_iat_future(verifier: JwtVerifier, keys: dict[str, Any]) -> None:
    await refused(verifier, token(keys, "ec1", "ES256", iat=int(time.time()) + 120), "not yet valid (iat")


async def test_wrong_issuer_and_audience(verifier: JwtVerifier, keys: dict[str, Any]) -> None:
    await refused(verifier, token(keys, "rsa1", "RS256", iss="https://evil"), "issuer not accepted")
    await refused(verifier, token(keys, "rsa1", "RS256", aud="other-service"), "audience not accepted")
    await refused(verifier, token(keys, "rsa1", "RS256", aud=None), "required claim 'aud'")
    await refused(verifier, token(keys, "rsa1", "RS256", iss=None), "required claim 'iss'")


@pytest.mark.parametrize("claim", ["tenant", "sub", "exp", "iat"])
async def test_missing_required_claim(verifier: JwtVerifier, keys: dict[str, Any], claim: str) -> None:
    await refused(verifier, token(keys, "rsa1", "RS256", **{claim: None}), f"required claim '{claim}'")


async def test_malformed_claims(verifier: JwtVerifier, keys: dict[str, Any]) -> None:
    await refused(verifier, token(keys, "rsa1", "RS256", tenant=""), "'tenant' must be a non-empty string")
    await refused(verifier, token(keys, "rsa1", "RS256", tenant=7), "'tenant' must be a non-empty string")
    await refused(verifier, token(keys, "rsa1", "RS256", roles={"a": 1}), "claim 'roles'")
    await refused(verifier, token(keys, "rsa1", "RS256", exp="soon"), "malformed token")
    await refused(verifier, token(keys, "rsa1", "RS256", sub=7), "malformed token")


# ---- algorithm attacks ----------------------------------------------------------------------


async def test_alg_none(verifier: JwtVerifier) -> None:
    for alg in ("none", "None", "NONE"):
        await refused(verifier, forge({"alg": alg, "typ": "JWT"}, claims(), None), "alg none")
    await refused(verifier, forge({"typ": "JWT"}, claims(), None), "alg none")


async def test_hs256_with_rsa_public_key_pem(
    verifier: JwtVerifier, asym_verifier: JwtVerifier, keys: dict[str, Any]
) -> None:
    pem = (
        keys["rsa1"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    forged = forge({"alg": "HS256", "typ": "JWT", "kid": "rsa1"}, claims(), pem)
    await refused(asym_verifier, forged, "algorithm 'HS256' not allowed")  # HS256 not allowed at all
    await refused(verifier, forged, "bad token signature")  # HS256 allowed: only the configured secret
    with pytest.raises(ValueError):
        JwtVerifier(ISS, AUD, hs256_secret=pem)


async def test_alg_key_type_mismatch(verifier: JwtVerifier, keys: dict[str, Any]) -> None:
    # ES256 header pointing at an RSA key, RS256 header pointing at an EC key
    ec_signed = jwt.encode(claims(), keys["ec1"], algorithm="ES256", headers={"kid": "rsa1"})
    await refused(verifier, ec_signed, "does not match key")
    rsa_signed = jwt.encode(claims(), keys["rsa1"], algorithm="RS256", headers={"kid": "ec1"})
    await refused(verifier, rsa_signed, "does not match key")
    rs512 = jwt.encode(claims(), keys["rsa1"], algorithm="RS512", headers={"kid": "rsa1"})
    await refused(verifier, rs512, "algorithm 'RS512' not allowed")


async def test_bad_signature(verifier: JwtVerifier, keys: dict[str, Any]) -> None:
    tok = token(keys, "rsa2", "RS256")
    header, payload, _ = tok.split(".")
    other = token(keys, "rsa1", "RS256").split(".")[2]
    h = _b64(json.dumps({"alg": "RS256", "kid": "rsa1", "typ": "JWT"}).encode())
    await refused(verifier, f"{h}.{payload}.{other}", "bad token signature")
    await refused(verifier, jwt.encode(claims(), b"x" * 40, algorithm="HS256"), "bad token signature")


async def test_no_kid(verifier: JwtVerifier, keys: dict[str, Any]) -> None:
    await refused(verifier, jwt.encode(claims(), keys["rsa1"], algorithm="RS256"), "no kid")


# ---- JWKS rotation ----------------------------------------------------------------------------


async def test_unknown_kid_then_rotation(verifier: JwtVerifier, jwks: Jwks, keys: dict[str, Any], clock: Clock) -> None:
    await verifier.verify(token(keys, "rsa1", "RS256"))
    assert jwks.fetches == 1
    new = token(keys, "rsa2", "RS256")
    clock.t += 11
    await refused(verifier, new, "unknown signing key id 'rsa2'")
    assert jwks.fetches == 2  # one refresh was tried
    jwks.kids = ["rsa2", "ec1"]  # the IdP rotates rsa1 -> rsa2
    clock.t += 5
    await refused(verifier, new, "unknown signing key id")  # refresh rate-limited
    assert jwks.fetches == 2
    clock.t += 6
    p = await verifier.verify(new)
    assert p.key_id == "rsa2" and jwks.fetches == 3
    await refused(verifier, token(keys, "rsa1", "RS256"), "unknown signing key id 'rsa1'")  # retired key


async def test_forged_kids_cannot_force_refresh_storm(verifier: JwtVerifier, jwks: Jwks, keys: dict[str, Any]) -> None:
    import asyncio

    toks = [jwt.encode(claims(), keys["rsa1"], algorithm="RS256", headers={"kid": f"bogus-{i}"}) for i in range(30)]
    results = await asyncio.gather(*(verifier.verify(t) for t in toks), return_exceptions=True)
    assert all(isinstance(r, Unauthenticated) for r in results)
    assert jwks.fetches == 1


async def test_jwks_unavailable(jwks: Jwks, keys: dict[str, Any], clock: Clock) -> None:
    jwks.fail = True
    v = JwtVerifier(ISS, AUD, jwks_fetcher=jwks, clock=clock)
    with pytest.raises(Unavailable):
        await v.verify(token(keys, "rsa1", "RS256"))
    jwks.fail = False
    clock.t += 10
    await v.verify(token(keys, "rsa1", "RS256"))
    # a later failure keeps the cached keys
    jwks.fail = True
    clock.t += 10
    await v.verify(token(keys, "rsa1", "RS256"))
    assert await v.refresh(force=True) is False
    await v.verify(token(keys, "ec1", "ES256"))


async def test_jwks_ignores_symmetric_and_bad_keys(keys: dict[str, Any], clock: Clock) -> None:
    good = _jwk(keys["rsa1"].public_key(), "rsa1", RSAAlgorithm)
    doc = {
        "keys": [
            {"kty": "oct", "kid": "hmac", "k": _b64(HS_SECRET)},
            {"kty": "RSA", "kid": "junk", "n": "x"},
            {"kid": 5},
            "nonsense",
            good,
        ]
    }

    async def fetch() -> str:
        return json.dumps(doc)

    v = JwtVerifier(ISS, AUD, jwks_fetcher=fetch, clock=clock, allowed_algs=("RS256", "ES256"))
    await v.verify(token(keys, "rsa1", "RS256"))
    hs = jwt.encode(claims(), HS_SECRET, algorithm="HS256", headers={"kid": "hmac"})
    await refused(v, hs, "not allowed")


# ---- malformed input ----------------------------------------------------------------------------


async def test_oversize(verifier: JwtVerifier, jwks: Jwks, keys: dict[str, Any]) -> None:
    big = token(keys, "rsa1", "RS256", pad="x" * 9000)
    await refused(verifier, big, "token too large (limit 8192 bytes)")
    await refused(verifier, "a" * 10_000_000, "too large")
    assert jwks.fetches == 0


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "abc",
        "a.b",
        "a.b.c",
        "....",
        "eyJhbGciOiJSUzI1NiJ9.e30",
        "é.é.é",
        _b64(b"[1,2]") + ".e30.sig",
        _b64(b'{"alg":"RS256","kid":7}') + ".e30.x",
    ],
)
async def test_garbage(verifier: JwtVerifier, garbage: str) -> None:
    with pytest.raises(Unauthenticated) as e:
        await verifier.verify(garbage)
    assert "malformed" in e.value.message or "missing" in e.value.message


async def test_non_string_token(verifier: JwtVerifier) -> None:
    with pytest.raises(Unauthenticated):
        await verifier.verify(None)  # type: ignore[arg-type]


def test_constructor_guards() -> None:
    with pytest.raises(ValueError):
        JwtVerifier(ISS, AUD, hs256_secret=b"short")
    with pytest.raises(ValueError):
        JwtVerifier(ISS, AUD, allowed_algs=("none",))
    with pytest.raises(ValueError):
        JwtVerifier(ISS, AUD, allowed_algs=("HS256",))
    assert JwtVerifier(ISS, AUD).allowed_algs == {"RS256", "ES256"}
    assert JwtVerifier(ISS, AUD, hs256_secret=HS_SECRET).allowed_algs == {"RS256", "ES256", "HS256"}


# ---- authorization ---------------------------------------------------------------------------------


def _p(scopes: set[str], roles: set[str] = frozenset()) -> Principal:  # type: ignore[assignment]
    return Principal("u", "t", frozenset(scopes), frozenset(roles), None, 0.0)


def test_authorize_scopes() -> None:
    authorize(_p({"inference:generate"}), "inference:generate", ())
    authorize(_p({"inference:*"}), "inference:generate", ())
    authorize(_p({"*"}), "admin:keys", ())
    authorize(_p(set()), "", ())
    assert not has_scope({"inference:*"}, "inferencex:generate")
    assert not has_scope({"inference:*"}, "inference")
    assert not has_scope({"inference:gen*"}, "inference:generate")
    with pytest.raises(PermissionDenied) as e:
        authorize(_p({"embed:read", "inference:*"}), "jobs:create", ())
    assert "missing scope 'jobs:create'" in e.value.message
    assert e.value.metadata == {"required_scope": "jobs:create"}


def test_authorize_roles() -> None:
    authorize(_p({"*"}, {"admin"}), "admin:keys", ["admin", "ops"])
    with pytest.raises(PermissionDenied, match="requires one of roles: admin, ops"):
        authorize(_p({"*"}, {"dev"}), "admin:keys", ["ops", "admin"])
    with pytest.raises(PermissionDenied, match="missing scope"):
        authorize(_p(set(), {"admin"}), "admin:keys", ["admin"])


async def test_verified_tokens_are_cached_until_expiry() -> None:
    import time as _time

    import jwt as _jwt

    secret = b"s" * 32
    v = JwtVerifier("iss", "aud", hs256_secret=secret)
    now = int(_time.time())
    token = _jwt.encode(
        {"iss": "iss", "aud": "aud", "sub": "u", "tenant": "t", "iat": now, "exp": now + 60},
        secret,
        algorithm="HS256",
        headers={"kid": "h"},
    )
    first = await v.verify(token)
    assert await v.verify(token) is first  # served from the cache
    expired = _jwt.encode(
        {"iss": "iss", "aud": "aud", "sub": "u", "tenant": "t", "iat": now - 600, "exp": now - 300},
        secret,
        algorithm="HS256",
        headers={"kid": "h"},
    )
    with pytest.raises(Unauthenticated):
        await v.verify(expired)
    with pytest.raises(Unauthenticated):  # failures are never cached as successes
        await v.verify(expired)
