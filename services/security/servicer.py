"""Security servicer: protobuf ↔ domain, a few lines per RPC. Blocking SQLite and
crypto work runs in worker threads; errors are domain errors the interceptor maps."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from llmesh.auth import pii
from llmesh.pb.security.v1 import security_pb2 as pb
from llmesh.pb.security.v1 import security_pb2_grpc as pb_grpc
from llmesh.runtime.errors import InvalidArgument, Unavailable
from llmesh.runtime.identity import HS256_SECRET, load_secret
from llmesh.services.security import apikeys as apikeys_mod
from llmesh.services.security import tokens as tokens_mod
from llmesh.services.security.apikeys import ApiKeyRecord, ApiKeys, granted_scopes
from llmesh.services.security.audit import AuditEntry, AuditLog, StoredRecord
from llmesh.services.security.keyring import DecryptError, Keyring
from llmesh.services.security.settings import SecuritySettings
from llmesh.services.security.store import open_database
from llmesh.services.security.tokens import TokenIssuer

log = logging.getLogger("llmesh.security")
Context = grpc.aio.ServicerContext[Any, Any]

MAX_PLAINTEXT = 1024 * 1024
MAX_ASSOCIATED_DATA = 64 * 1024


def ts(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    t = timestamp_pb2.Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


def key_pb(k: ApiKeyRecord) -> pb.ApiKey:
    return pb.ApiKey(
        key_id=k.key_id,
        owner=k.owner,
        tenant=k.tenant,
        scopes=k.scopes,
        roles=k.roles,
        created_at=ts(k.created_at),
        expires_at=ts(k.expires_at),
        revoked=k.revoked,
        rotated_at=ts(k.rotated_at),
        revoked_at=ts(k.revoked_at),
    )


def record_pb(r: StoredRecord) -> pb.AuditRecord:
    t = timestamp_pb2.Timestamp()
    t.FromMicroseconds(r.time_us)
    return pb.AuditRecord(
        sequence=r.sequence,
        time=t,
        actor=r.actor,
        action=r.action,
        resource=r.resource,
        outcome=r.outcome,
        attributes=r.attributes,
        prev_hash=r.prev_hash,
        hash=r.hash,
    )


def entry(req: pb.AppendAuditRequest) -> AuditEntry:
    return AuditEntry(req.actor, req.action, req.resource, req.outcome, dict(req.attributes))


def _bytes(value: bytes, field: str, limit: int) -> bytes:
    if len(value) > limit:
        raise InvalidArgument(field, f"is {len(value)} bytes, the limit is {limit}")
    return value


def _ciphertext(value: bytes) -> bytes:
    if not value:
        raise InvalidArgument("ciphertext", "must not be empty")
    return _bytes(value, "ciphertext", MAX_PLAINTEXT + 256)


class SecurityServicer(pb_grpc.SecurityServicer):
    def __init__(self, cfg: SecuritySettings, state_dir: Path) -> None:
        self.cfg = cfg
        self.state_dir = state_dir
        self.db = open_database(state_dir / "security.db")
        self.keyring = Keyring(state_dir / "master.key")
        self.api_keys = ApiKeys(self.keyring)
        # HS256 (development): the secret the gateway shares, LLMESH_HOME/security/jwt-hs256.key.
        hs256 = load_secret(state_dir.parent, HS256_SECRET) if cfg.signing_algorithm == "HS256" else None
        self.tokens = TokenIssuer(cfg, self.keyring, hs256)
        self.audit = AuditLog()
        self._ready = False

    # ---- lifecycle ----------------------------------------------------------
    def _start_sync(self) -> None:
        if not self._ready:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self.db.is_open:
                self.db.open_sync()
            self.db.call_sync(self.keyring.load_sync)
            self.db.call_sync(self.tokens.load_sync)
            self._ready = True
            log.info(
                "security state loaded",
                extra={
                    "fields": {
                        "db": str(self.db.path),
                        "data_key": self.keyring.current_version,
                        "signing_kid": self.tokens.active.kid,
                    }
                },
            )

    async def start(self) -> None:
        """Warm-up: open the database, load (or create) the master key, data keys and signing keys."""
        await asyncio.to_thread(self._start_sync)

    async def close(self) -> None:
        self._ready = False
        await asyncio.to_thread(self.db.close_sync)

    def _check_ready(self) -> None:
        if not self._ready:
            raise Unavailable("security service is starting", retry_after_s=1.0)

    # ---- API keys -----------------------------------------------------------
    async def CreateApiKey(self, request: pb.CreateApiKeyRequest, context: Context) -> pb.CreateApiKeyResponse:
        self._check_ready()
        rec, secret = await self.db.call(
            lambda c: self.api_keys.create_sync(
                c, request.owner, request.tenant, request.scopes, request.roles, request.ttl_days
            )
        )
        return pb.CreateApiKeyResponse(key=key_pb(rec), secret=secret)

    async def ListApiKeys(self, request: pb.ListApiKeysRequest, context: Context) -> pb.ListApiKeysResponse:
        self._check_ready()
        recs = await self.db.call(lambda c: self.api_keys.list_sync(c, request.owner, request.tenant))
        return pb.ListApiKeysResponse(keys=[key_pb(k) for k in recs])

    async def RevokeApiKey(self, request: pb.RevokeApiKeyRequest, context: Context) -> pb.ApiKey:
        self._check_ready()
        apikeys_mod.check_key_id(request.key_id)
        return key_pb(await self.db.call(lambda c: self.api_keys.revoke_sync(c, request.key_id)))

    async def RotateApiKey(self, request: pb.RotateApiKeyRequest, context: Context) -> pb.RotateApiKeyResponse:
        self._check_ready()
        apikeys_mod.check_key_id(request.key_id)
        rec, secret = await self.db.call(lambda c: self.api_keys.rotate_sync(c, request.key_id))
        return pb.RotateApiKeyResponse(key=key_pb(rec), secret=secret)

    async def GetApiKeySecret(self, request: pb.GetApiKeySecretRequest, context: Context) -> pb.GetApiKeySecretResponse:
        self._check_ready()
        rec, secret = await self.db.call(lambda c: self.api_keys.secret_sync(c, request.key_id))
        return pb.GetApiKeySecretResponse(key=key_pb(rec), secret=secret)

    # ---- tokens ---------------------------------------------------------------
    async def IssueToken(self, request: pb.IssueTokenRequest, context: Context) -> pb.IssueTokenResponse:
        self._check_ready()
        rec = await self.db.call(lambda c: self.api_keys.authenticate_sync(c, request.key_id, request.secret))
        scopes = granted_scopes(rec, request.scopes)
        token, exp, kid = await asyncio.to_thread(self.tokens.issue, rec, scopes, request.ttl_seconds)
        return pb.IssueTokenResponse(token=token, expires_at=ts(exp), kid=kid, scopes=scopes)

    async def GetJwks(self, request: pb.GetJwksRequest, context: Context) -> pb.GetJwksResponse:
        self._check_ready()
        return pb.GetJwksResponse(jwks_json=json.dumps(self.tokens.jwks(), separators=(",", ":")))

    async def RotateSigningKey(
        self, request: pb.RotateSigningKeyRequest, context: Context
    ) -> pb.RotateSigningKeyResponse:
        self._check_ready()
        tokens_mod.check_algorithm(request.algorithm, self.cfg.signing_algorithm)
        new, old = await self.db.call(lambda c: self.tokens.rotate_sync(c, request.algorithm))
        return pb.RotateSigningKeyResponse(
            kid=new.kid,
            algorithm=new.algorithm,
            previous_kid=old.kid if old else "",
            previous_retires_at=ts(old.retire_at) if old else None,
        )

    # ---- encryption ---------------------------------------------------------
    async def Encrypt(self, request: pb.EncryptRequest, context: Context) -> pb.EncryptResponse:
        self._check_ready()
        pt = _bytes(request.plaintext, "plaintext", MAX_PLAINTEXT)
        aad = _bytes(request.associated_data, "associated_data", MAX_ASSOCIATED_DATA)
        ct, version = await asyncio.to_thread(self.keyring.encrypt, pt, aad)
        return pb.EncryptResponse(ciphertext=ct, key_version=version)

    async def Decrypt(self, request: pb.DecryptRequest, context: Context) -> pb.DecryptResponse:
        self._check_ready()
        ct = _ciphertext(request.ciphertext)
        aad = _bytes(request.associated_data, "associated_data", MAX_ASSOCIATED_DATA)
        try:
            pt, version = await asyncio.to_thread(self.keyring.decrypt, ct, aad)
        except DecryptError as e:
            raise InvalidArgument("ciphertext", str(e)) from None
        return pb.DecryptResponse(plaintext=pt, key_version=version)

    async def Rewrap(self, request: pb.RewrapRequest, context: Context) -> pb.RewrapResponse:
        self._check_ready()
        ct = _ciphertext(request.ciphertext)
        aad = _bytes(request.associated_data, "associated_data", MAX_ASSOCIATED_DATA)
        try:
            new_ct, new, old = await asyncio.to_thread(self.keyring.rewrap, ct, aad)
        except DecryptError as e:
            raise InvalidArgument("ciphertext", str(e)) from None
        return pb.RewrapResponse(ciphertext=new_ct, key_version=new, previous_key_version=old)

    async def RotateDataKey(self, request: pb.RotateDataKeyRequest, context: Context) -> pb.RotateDataKeyResponse:
        self._check_ready()
        version, n = await self.db.call(lambda c: self.keyring.rotate_sync(c, [apikeys_mod.STORED, tokens_mod.STORED]))
        return pb.RotateDataKeyResponse(key_version=version, rewrapped=n)

    # ---- masking ----------------------------------------------------------------
    async def GetMaskingRules(self, request: pb.GetMaskingRulesRequest, context: Context) -> pb.MaskingRules:
        return pb.MaskingRules(
            version=pii.VERSION,
            rules=[
                pb.MaskingRule(
                    name=e.name,
                    pattern=e.pattern,
                    reversible=e.reversible,
                    operator=e.operator.value,
                    validator=e.validator,
                    label=e.label,
                )
                for e in pii.ENTITIES  # the gateway's masker compiles exactly these
            ],
        )

    # ---- audit ------------------------------------------------------------------
    async def AppendAudit(self, request: pb.AppendAuditRequest, context: Context) -> pb.AuditRecord:
        self._check_ready()
        records = await self.db.call(lambda c: self.audit.append_sync(c, [entry(request)]))
        return record_pb(records[0])

    async def AppendAuditBatch(
        self, request: pb.AppendAuditBatchRequest, context: Context
    ) -> pb.AppendAuditBatchResponse:
        self._check_ready()
        entries = [entry(r) for r in request.records]
        records = await self.db.call(lambda c: self.audit.append_sync(c, entries))
        return pb.AppendAuditBatchResponse(records=[record_pb(r) for r in records])

    async def QueryAudit(self, request: pb.QueryAuditRequest, context: Context) -> pb.QueryAuditResponse:
        self._check_ready()
        since_us = 0
        if request.HasField("since"):
            if request.since.seconds < 0 or not 0 <= request.since.nanos < 1_000_000_000:
                raise InvalidArgument("since", "must be a valid time after 1970-01-01")
            since_us = request.since.ToMicroseconds()
        records = await self.db.read(
            lambda c: self.audit.query_sync(
                c, request.actor, request.action, since_us, request.limit, request.after_sequence
            )
        )
        return pb.QueryAuditResponse(records=[record_pb(r) for r in records])

    async def VerifyAuditChain(
        self, request: pb.VerifyAuditChainRequest, context: Context
    ) -> pb.VerifyAuditChainResponse:
        self._check_ready()
        v = await self.db.read(self.audit.verify_sync)
        return pb.VerifyAuditChainResponse(
            intact=v.intact, records=v.records, first_bad_sequence=v.first_bad_sequence, detail=v.detail
        )
