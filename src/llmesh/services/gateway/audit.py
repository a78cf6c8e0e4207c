"""Audit records for every call, sent to the security service in batches off the
request path; flushed on a clean shutdown so nothing acknowledged is lost."""

from __future__ import annotations

import asyncio
import logging

import grpc

from llmesh.runtime.identity import IDENTITY_KEY, InternalIdentity, Principal
from llmesh.security.v1 import security_pb2, security_pb2_grpc

log = logging.getLogger(__name__)
GATEWAY = Principal("llmesh-gateway", "system", frozenset({"security:audit", "security:internal"}))


class AuditSink:
    def __init__(self, channel: grpc.aio.Channel, identity: InternalIdentity, *, batch: int = 200,
                 interval_s: float = 0.5, max_pending: int = 100_000) -> None:
        self._stub = security_pb2_grpc.SecurityStub(channel)
        self._identity = identity
        self._batch = batch
        self._interval_s = interval_s
        self._max_pending = max_pending
        self._pending: list[security_pb2.AppendAuditRequest] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def record(self, rec: security_pb2.AppendAuditRequest) -> None:
        """Queue one record; never blocks the call."""
        if len(self._pending) >= self._max_pending:
            log.error("audit backlog full: dropping the oldest record")
            self._pending.pop(0)
        self._pending.append(rec)
        if len(self._pending) >= self._batch:
            self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self._interval_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        while self._pending:
            chunk = self._pending[: self._batch]
            md = ((IDENTITY_KEY, self._identity.mint(GATEWAY)),)
            try:
                await self._stub.AppendAuditBatch(security_pb2.AppendAuditBatchRequest(records=chunk), metadata=md, timeout=10)
            except grpc.aio.AioRpcError as e:  # keep the records and retry on the next tick
                log.warning("audit flush failed", extra={"fields": {"code": e.code().name, "pending": len(self._pending)}})
                return
            del self._pending[: len(chunk)]

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.flush()
