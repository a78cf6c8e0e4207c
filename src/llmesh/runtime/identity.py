"""Internal identity: the gateway vouches for a verified caller with a short-lived
token; every service refuses calls without a valid one, so nothing reaches a service
around the gateway.

The token is a JWT (HS256) over a secret shared by the mesh's processes on this host
(``LLMESH_HOME/security/internal.key``, created 0600 on first use), with audience
``llmesh-internal`` and a lifetime of 60 s. It carries the principal, tenant, scopes
and roles, which services read with :meth:`InternalIdentity.principal`.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import jwt

from llmesh.runtime import policy
from llmesh.runtime.errors import PermissionDenied, Unauthenticated
from llmesh.runtime.files import load_or_create_secret

Context = grpc.aio.ServicerContext[Any, Any]
Req = TypeVar("Req")
Resp = TypeVar("Resp")
K = TypeVar("K")
V = TypeVar("V")

IDENTITY_KEY = "x-llmesh-identity"
ISSUER = "llmesh-gateway"
AUDIENCE = "llmesh-internal"
TTL_S = 60
# The secret internal identity tokens are signed with.
INTERNAL_SECRET = "internal.key"
# The development-only HS256 JWT secret (security.signing_algorithm: HS256).
HS256_SECRET = "jwt-hs256.key"


@dataclass(frozen=True)
class Principal:
    subject: str
    tenant: str
    scopes: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()


def load_secret(home: Path, name: str = INTERNAL_SECRET) -> bytes:
    """A 32-byte secret shared by the mesh's processes on this host
    (``LLMESH_HOME/security/<name>``, 0600 in a 0700 folder that also holds the security
    service's database and master key); the first process to need it creates it."""
    return load_or_create_secret(home / "security" / name, lambda: secrets.token_bytes(32), size=32)


class InternalIdentity:
    """Mints and verifies internal identity tokens. Both sides cache: a principal's
    token is reused until half its lifetime is gone, and a verified token is
    remembered until it expires, so a busy caller pays for HMAC and JSON once per
    ~30 s instead of on every call (bounded LRUs; see ``CACHE``)."""

    CACHE = 4096
    REMINT_AFTER_S = TTL_S // 2

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self._minted: OrderedDict[Principal, tuple[str, float]] = OrderedDict()
        self._verified: OrderedDict[str, tuple[Principal, float]] = OrderedDict()

    def mint(self, p: Principal, *, now: float | None = None) -> str:
        if now is None:
            hit = self._minted.get(p)
            if hit is not None and hit[1] > time.time():
                return hit[0]
        t = int(now if now is not None else time.time())
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": p.subject,
            "tenant": p.tenant,
            "scopes": sorted(p.scopes),
            "roles": sorted(p.roles),
            "iat": t,
            "exp": t + TTL_S,
        }
        token = jwt.encode(claims, self._secret, algorithm="HS256")
        if now is None:
            _remember(self._minted, p, (token, t + self.REMINT_AFTER_S), self.CACHE)
        return token

    def verify(self, token: str) -> Principal:
        hit = self._verified.get(token)
        if hit is not None and hit[1] > time.time():
            return hit[0]
        try:
            c = jwt.decode(
                token,
                self._secret,
                algorithms=["HS256"],
                audience=AUDIENCE,
                issuer=ISSUER,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
                leeway=5,
            )
        except jwt.PyJWTError as e:
            raise Unauthenticated(f"invalid internal identity: {e}") from None
        p = Principal(c["sub"], str(c.get("tenant", "")), frozenset(c.get("scopes", ())), frozenset(c.get("roles", ())))
        _remember(self._verified, token, (p, float(c["exp"])), self.CACHE)
        return p

    def principal(self, context: Context) -> Principal:
        """The caller of the current RPC (the interceptor has already checked it)."""
        return self.verify(str(dict(context.invocation_metadata() or ()).get(IDENTITY_KEY, "")))


class IdentityInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every RPC (health and reflection aside) without a valid internal
    identity (UNAUTHENTICATED), and enforces the method's ``method_policy`` scope and
    roles on that identity (PERMISSION_DENIED) — the gateway checked them already;
    services check again so nothing depends on one component being right."""

    EXEMPT = ("/grpc.health.", "/grpc.reflection.")

    def __init__(self, identity: InternalIdentity) -> None:
        self.identity = identity

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Req, Resp] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Req, Resp] | None:
        if handler_call_details.method.startswith(self.EXEMPT):
            return await continuation(handler_call_details)
        md = dict(handler_call_details.invocation_metadata or ())
        token = md.get(IDENTITY_KEY)
        try:
            if not isinstance(token, str) or not token:
                raise Unauthenticated("missing internal identity: call the mesh through the gateway")
            principal = self.identity.verify(token)
        except Unauthenticated as e:
            return _refuse(grpc.StatusCode.UNAUTHENTICATED, str(e))
        try:
            policy.check(principal, handler_call_details.method)
        except PermissionDenied as e:
            return _refuse(grpc.StatusCode.PERMISSION_DENIED, str(e))
        return await continuation(handler_call_details)


def _remember(cache: OrderedDict[K, V], key: K, value: V, limit: int) -> None:
    cache[key] = value
    cache.move_to_end(key)
    if len(cache) > limit:
        cache.popitem(last=False)


def _refuse(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler[Any, Any]:
    async def deny(request: object, context: Context) -> None:
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(deny)
