"""Internal identity: the gateway vouches for a verified caller with a short-lived
token; every service refuses calls without a valid one, so nothing reaches a service
around the gateway.

The token is a JWT (HS256) over a secret shared by the mesh's processes on this host
(``LLMESH_HOME/security/internal.key``, created 0600 on first use), with audience
``llmesh-internal`` and a lifetime of 60 s. It carries the principal, tenant, scopes
and roles, which services read with :meth:`InternalIdentity.principal`.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import grpc
import jwt

from llmesh.runtime.errors import Unauthenticated

IDENTITY_KEY = "x-llmesh-identity"
ISSUER = "llmesh-gateway"
AUDIENCE = "llmesh-internal"
TTL_S = 60


@dataclass(frozen=True)
class Principal:
    subject: str
    tenant: str
    scopes: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()


def load_secret(home: Path) -> bytes:
    """The shared internal secret; the first process to need it creates it."""
    path = home / "security" / "internal.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # another process may be writing it right now
            data = path.read_bytes()
            if len(data) == 32:
                return data
            time.sleep(0.01)
        raise RuntimeError(f"{path} is not a 32-byte key")
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    return key


class InternalIdentity:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def mint(self, p: Principal, *, now: float | None = None) -> str:
        t = int(now if now is not None else time.time())
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": p.subject, "tenant": p.tenant,
                  "scopes": sorted(p.scopes), "roles": sorted(p.roles), "iat": t, "exp": t + TTL_S}
        return jwt.encode(claims, self._secret, algorithm="HS256")

    def verify(self, token: str) -> Principal:
        try:
            c = jwt.decode(token, self._secret, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER,
                           options={"require": ["exp", "iat", "sub", "iss", "aud"]}, leeway=5)
        except jwt.PyJWTError as e:
            raise Unauthenticated(f"invalid internal identity: {e}") from None
        return Principal(c["sub"], str(c.get("tenant", "")), frozenset(c.get("scopes", ())), frozenset(c.get("roles", ())))

    def principal(self, context: grpc.aio.ServicerContext) -> Principal:
        """The caller of the current RPC (the interceptor has already checked it)."""
        return self.verify(str(dict(context.invocation_metadata() or ()).get(IDENTITY_KEY, "")))


class IdentityInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every RPC (health and reflection aside) without a valid internal identity."""

    EXEMPT = ("/grpc.health.", "/grpc.reflection.")

    def __init__(self, identity: InternalIdentity) -> None:
        self.identity = identity

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if handler_call_details.method.startswith(self.EXEMPT):
            return await continuation(handler_call_details)
        md = dict(handler_call_details.invocation_metadata or ())
        token = md.get(IDENTITY_KEY)
        try:
            if not isinstance(token, str) or not token:
                raise Unauthenticated("missing internal identity: call the mesh through the gateway")
            self.identity.verify(token)
        except Unauthenticated as e:
            return _refuse(str(e))
        return await continuation(handler_call_details)


def _refuse(message: str) -> grpc.RpcMethodHandler:
    async def deny(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(deny)
