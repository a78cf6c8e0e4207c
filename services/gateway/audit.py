"""Audit records for every call, sent to the security service in batches off the
request path; flushed on a clean shutdown so nothing acknowledged is lost.

If the security service cannot take them at shutdown, the pending records are
spooled to ``spool_dir`` (one ``AppendAuditBatchRequest`` per file, written
atomically) and the next gateway to start on this host claims the files (atomic
rename, so two replicas never both send one) and delivers them first."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import grpc

from llmesh.pb.security.v1 import security_pb2, security_pb2_grpc
from llmesh.runtime.identity import IDENTITY_KEY, InternalIdentity, Principal

log = logging.getLogger(__name__)
GATEWAY = Principal("llmesh-gateway", "system", frozenset({"security:audit", "security:internal"}))


class AuditSink:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        identity: InternalIdentity,
        *,
        batch: int = 200,
        interval_s: float = 0.5,
        max_pending: int = 100_000,
        spool_dir: Path | None = None,
    ) -> None:
        self._stub = security_pb2_grpc.SecurityStub(channel)
        self._spool_dir = spool_dir
        self._claimed: list[Path] = []
        self._identity = identity
        self._batch = batch
        self._interval_s = interval_s
        self._max_pending = max_pending
        self._pending: list[security_pb2.AppendAuditRequest] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._recover_spool()
        self._task = asyncio.create_task(self._run())

    def _recover_spool(self) -> None:
        if self._spool_dir is None or not self._spool_dir.is_dir():
            return
        for path in sorted(self._spool_dir.glob("*.pb")):
            claimed = path.with_suffix(f".claimed-{os.getpid()}")
            try:
                path.rename(claimed)
            except FileNotFoundError:
                continue  # another replica claimed it
            batch = security_pb2.AppendAuditBatchRequest.FromString(claimed.read_bytes())
            self._pending[:0] = list(batch.records)
            self._claimed.append(claimed)
        if self._claimed:
            log.warning("audit: delivering spooled records", extra={"fields": {"records": len(self._pending)}})
            self._wake.set()  # now, not at the next tick

    def _spool(self) -> None:
        if self._spool_dir is None or not self._pending:
            return
        self._spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._spool_dir / f"{time.time_ns()}-{os.getpid()}.pb"
        tmp = path.with_suffix(".tmp")
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(security_pb2.AppendAuditBatchRequest(records=self._pending).SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(path)
        log.error(
            "audit: security service unreachable at shutdown; records spooled",
            extra={"fields": {"records": len(self._pending), "path": str(path)}},
        )
        self._pending.clear()

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
            except TimeoutError:
                pass
            self._wake.clear()
            await self.flush()

    async def flush(self, timeout_s: float = 10.0) -> None:
        while self._pending:
            chunk = self._pending[: self._batch]
            md = ((IDENTITY_KEY, self._identity.mint(GATEWAY)),)
            try:
                await self._stub.AppendAuditBatch(
                    security_pb2.AppendAuditBatchRequest(records=chunk), metadata=md, timeout=timeout_s
                )
            except grpc.aio.AioRpcError as e:  # keep the records and retry on the next tick
                log.warning(
                    "audit flush failed", extra={"fields": {"code": e.code().name, "pending": len(self._pending)}}
                )
                return
            del self._pending[: len(chunk)]
        for path in self._claimed:  # everything recovered from the spool is delivered
            path.unlink(missing_ok=True)
        self._claimed.clear()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.flush(timeout_s=5.0)  # bounded: the process is being asked to stop
        self._spool()
