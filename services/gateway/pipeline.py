"""The gateway's policy pipeline, in order: authenticate (JWT) → verify the request
signature (HMAC) → authorize (the method's scope/roles from its proto
option) → one Redis round trip (nonce claimed: replays refused; requests counted; LLM
token budget checked for generation) → mask sensitive
fields → forward with an internal identity → unmask the response → audit (the record is
in the gateway's durable spool before the response is released; refusals too)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import Message

from llmesh.auth.signature import key_id_of, nonce_key, nonce_ttl, verify
from llmesh.pb.common.v1 import types_pb2
from llmesh.pb.security.v1 import security_pb2, security_pb2_grpc
from llmesh.runtime.errors import LlmeshError, Unauthenticated
from llmesh.runtime.identity import IDENTITY_KEY, InternalIdentity
from llmesh.runtime.identity import Principal as InternalPrincipal
from llmesh.runtime.interceptors import REQUEST_ID_KEY
from llmesh.runtime.logs import request_id_var
from llmesh.runtime.policy import authorize
from llmesh.services.gateway.audit import GATEWAY, AuditSink
from llmesh.services.gateway.authn import JwtVerifier, Principal
from llmesh.services.gateway.fields import StreamRestorer, has_pii, mask_message, message_class, restore_message
from llmesh.services.gateway.masking import Masker, Vault
from llmesh.services.gateway.proxy import Context, Forward, forwardable
from llmesh.services.gateway.ratelimit import RateLimiter
from llmesh.services.gateway.routes import Route
from llmesh.services.gateway.settings import RATE_LIMIT_CLASSES

ANONYMOUS = InternalPrincipal("anonymous", "")


class SecretCache:
    """API key secrets from the security service, cached briefly (revocation takes
    effect within ``ttl_s``)."""

    def __init__(self, channel: grpc.aio.Channel, identity: InternalIdentity, ttl_s: float = 30.0) -> None:
        self._stub = security_pb2_grpc.SecurityStub(channel)
        self._identity = identity
        self._ttl_s = ttl_s
        self._cache: dict[str, tuple[bytes, float]] = {}

    async def get(self, key_id: str) -> bytes:
        hit = self._cache.get(key_id)
        if hit and hit[1] > time.monotonic():
            return hit[0]
        try:
            resp = await self._stub.GetApiKeySecret(
                security_pb2.GetApiKeySecretRequest(key_id=key_id),
                metadata=((IDENTITY_KEY, self._identity.mint(GATEWAY)),),
                timeout=5,
            )
        except grpc.aio.AioRpcError as e:
            if e.code() in (
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.INVALID_ARGUMENT,
            ):
                raise Unauthenticated("unknown, revoked or expired API key") from None
            raise
        secret = resp.secret.encode()
        self._cache[key_id] = (secret, time.monotonic() + self._ttl_s)
        return secret


@dataclass
class Pipeline:
    verifier: JwtVerifier
    secrets: SecretCache
    limiter: RateLimiter
    masker: Masker
    identity: InternalIdentity
    audit: AuditSink
    require_signature: bool
    skew_s: float
    _debits: set[asyncio.Task[int | None]] = field(default_factory=set)

    async def admit(self, route: Route, context: Context, body: bytes | None) -> Forward:
        started = time.perf_counter()
        digest = hashlib.sha256(body or b"").hexdigest()
        policy = route.policy
        caller: Principal | None = None

        def refused(e: LlmeshError) -> Awaitable[None]:  # refused calls are audited too, with the reason
            actor = caller.subject if caller else ("anonymous" if policy.anonymous else "unauthenticated")
            return self._audit(
                route,
                actor,
                caller.tenant if caller else "",
                e.code,
                started,
                digest,
                {"reason": str(e)[:200], "peer": context.peer()},
            )

        try:
            md = dict(context.invocation_metadata() or ())
            nonce: str | None = None
            if not policy.anonymous:
                caller = await self.verifier.verify(str(md.get("authorization", "")))
                if self.require_signature:
                    nonce = await self._check_signature(route, md, body, caller)
                authorize(caller, policy.scope, list(policy.roles))
        except LlmeshError as e:
            await refused(e)
            raise
        who = _bucket(caller, context.peer())
        klass = RATE_LIMIT_CLASSES.get(policy.rate_limit_class, "read")
        # One Redis round trip: nonce claim + token budget + request count. Read-class
        # methods are side-effect free by policy, so that round trip overlaps the
        # upstream call (the proxy releases no response before it passed); every other
        # class is checked before anything is forwarded.
        quota = _audited(
            self.limiter.admit(
                who, klass, nonce_key=nonce, nonce_ttl_s=nonce_ttl(self.skew_s), tokens=klass == "generate"
            ),
            refused,
        )
        gate: Awaitable[None] | None = None
        if klass == "read":
            gate = asyncio.ensure_future(quota)
        else:
            await quota

        vault = Vault()
        entities: dict[str, int] = {}
        in_cls, out_cls = message_class(route.method.input_type), message_class(route.method.output_type)
        mask_in, restore_out = has_pii(route.method.input_type), has_pii(route.method.output_type)

        def mask_request(raw: bytes) -> bytes:
            if not mask_in:
                return raw
            msg = in_cls.FromString(raw)
            for k, v in mask_message(msg, self.masker, vault).items():
                entities[k] = entities.get(k, 0) + v
            return msg.SerializeToString()

        streamer = StreamRestorer(vault) if route.server_streaming else None

        def restore_response(raw: bytes) -> bytes:
            if not restore_out or not len(vault):
                return raw
            msg = out_cls.FromString(raw)
            if streamer is not None:
                streamer.restore(msg)
            else:
                restore_message(msg, vault)
            return msg.SerializeToString()

        def response_tail() -> bytes | None:
            last = streamer.tail(out_cls) if streamer is not None else None
            return None if last is None else last.SerializeToString()

        internal = (
            ANONYMOUS
            if caller is None
            else InternalPrincipal(caller.subject, caller.tenant, caller.scopes, caller.roles)
        )
        metadata = [
            *forwardable(tuple(context.invocation_metadata() or ())),
            (IDENTITY_KEY, self.identity.mint(internal)),
        ]
        metadata = [
            (k, v) for k, v in metadata if (not k.startswith("x-llmesh-") or k == IDENTITY_KEY) and k != REQUEST_ID_KEY
        ]
        if rid := request_id_var.get():
            metadata.append((REQUEST_ID_KEY, rid))  # one request id across the hops

        async def done(code: grpc.StatusCode, last: bytes | None) -> None:
            await self._audit(
                route,
                internal.subject,
                internal.tenant,
                code,
                started,
                digest,
                {"pii": ",".join(f"{k}={v}" for k, v in sorted(entities.items()))},
            )
            if code == grpc.StatusCode.OK and klass == "generate" and last is not None:
                used = _usage(out_cls, last)
                if used:  # off the response path: the budget is eventually consistent anyway
                    task = asyncio.create_task(self.limiter.debit(who, used))
                    self._debits.add(task)
                    task.add_done_callback(self._debits.discard)

        return Forward(metadata, mask_request, restore_response, done, response_tail, gate)

    def _audit(
        self,
        route: Route,
        actor: str,
        tenant: str,
        code: grpc.StatusCode,
        started: float,
        digest: str,
        extra: dict[str, str],
    ) -> Awaitable[None]:
        """Spools the call's record; the response waits for the result (durable)."""
        return self.audit.record(
            security_pb2.AppendAuditRequest(
                actor=actor,
                action=route.path,
                resource=route.service,
                outcome=code.name,
                attributes={
                    "tenant": tenant,
                    "latency_ms": f"{(time.perf_counter() - started) * 1000:.2f}",
                    "request_sha256": digest,
                    **extra,
                },
            )
        )

    async def _check_signature(
        self, route: Route, md: dict[str, str | bytes], body: bytes | None, caller: Principal
    ) -> str:
        """Verify the HMAC; returns the Redis key of the nonce, which ``admit`` claims."""
        key_id = key_id_of(md)
        if caller.api_key_id and key_id != caller.api_key_id:
            raise Unauthenticated("signature key id does not match the token's key")
        signed = verify(await self.secrets.get(key_id), route.path, body or b"", md, skew_s=self.skew_s)
        return nonce_key(signed.key_id, signed.nonce)


async def _audited(check: Awaitable[None], refused: Callable[[LlmeshError], Awaitable[None]]) -> None:
    try:
        await check
    except LlmeshError as e:
        await refused(e)
        raise


def _bucket(caller: Principal | None, peer: str) -> str:
    """Who a rate limit counts: the API key (or subject) within its tenant; anonymous
    calls (token exchange, JWKS) per client address, so one client cannot starve all."""
    if caller is None:
        host = peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer
        return f"anonymous/{host}"
    return f"{caller.tenant}/{caller.api_key_id or caller.subject}"


def _usage(cls: type[Message], raw: bytes) -> int:
    msg = cls.FromString(raw)
    usage = getattr(msg, "usage", None)
    return int(usage.total_tokens) if isinstance(usage, types_pb2.Usage) else 0
