"""Audit records for every call: durable in a local spool before the call's response is
released, then sent to the security service in batches off the request path.

The spool (``spool_dir``, shared by the gateways of one home) is append-only. Each
gateway process writes segments of its own, ``<time_ns>-<pid>.wal``, and holds an
exclusive ``flock`` on each while it lives. A frame is ``length (u32) | crc32 (u32) |
kind (u8) | payload``; a record frame holds one call's record as a one-record
``AppendAuditBatchRequest`` (so a batch is the concatenation of its frames' payloads),
an acknowledgement frame the number of the segment's records the security service has
taken (appended after each delivered batch).

Group commit: ``record`` writes the frame at once (the page cache outlives a killed
process) and returns a future; one fdatasync, in the spool's own thread, covers every
frame written before it started and resolves their futures. Responses wait for them, so
under load the records of many calls share one fsync, and a commit starts as soon as
the previous one ends.

On start a gateway claims every segment no live process holds (a lock is free once its
owner died, even by SIGKILL), drops a torn tail, and delivers the records after the
last acknowledgement before its own. A segment is deleted once it is no longer written
and all its records are delivered. Delivery is at least once: a batch delivered just
before a crash, whose acknowledgement was not yet written, is sent again."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import struct
import time
import zlib
from collections.abc import Awaitable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from llmesh.pb.security.v1 import security_pb2
from llmesh.runtime.errors import Unavailable
from llmesh.runtime.files import fsync_dir
from llmesh.runtime.identity import IDENTITY_KEY, InternalIdentity, Principal

log = logging.getLogger(__name__)
GATEWAY = Principal("llmesh-gateway", "system", frozenset({"security:audit", "security:internal"}))
APPEND_BATCH = "/llmesh.security.v1.Security/AppendAuditBatch"

RECORD, ACK = 1, 2
_HEAD = struct.Struct("<IIB")  # payload length, crc32 of kind + payload, kind
_ACK = struct.Struct("<Q")
_MAX_FRAME = 16 << 20  # a longer length field is corruption, not a record
_READ_BLOCK = 256 << 10


def _frame(kind: int, payload: bytes) -> bytes:
    return _HEAD.pack(len(payload), zlib.crc32(payload, zlib.crc32(bytes((kind,)))), kind) + payload


def _frames(fd: int, start: int, end: int) -> Iterator[tuple[int, bytes, int]]:
    """``(kind, payload, offset after it)`` of each intact frame in ``[start, end)``;
    stops at the first torn or corrupt one (what a crash mid-write leaves)."""
    buf, base, pos = b"", start, start

    def window(n: int) -> bytes:
        nonlocal buf, base
        if pos + n > base + len(buf):
            buf = buf[pos - base :] + os.pread(fd, max(_READ_BLOCK, n), base + len(buf))
            base = pos
        return buf[pos - base : pos - base + n]

    while pos + _HEAD.size <= end:
        head = window(_HEAD.size)
        if len(head) < _HEAD.size:
            return
        length, crc, kind = _HEAD.unpack(head)
        if length > _MAX_FRAME or pos + _HEAD.size + length > end:
            return
        payload = window(_HEAD.size + length)[_HEAD.size :]
        if len(payload) != length or zlib.crc32(payload, zlib.crc32(bytes((kind,)))) != crc:
            return
        pos += _HEAD.size + length
        yield kind, payload, pos


@dataclass(eq=False)
class Segment:
    path: Path
    fd: int
    size: int = 0  # bytes of intact frames
    appended: int = 0  # record frames in it
    delivered: int = 0  # the first ``delivered`` records are in the security service
    read_at: int = 0  # offset after the last delivered record
    writing: bool = True  # this process appends records to it
    retired: bool = False  # deleted while an fsync used it: closed when that ends

    def write(self, data: bytes) -> None:
        """Appends ``data`` whole or not at all (a short write is cut off again)."""
        try:
            if os.write(self.fd, data) != len(data):
                raise OSError("short write")
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)
            raise
        self.size += len(data)


def _scan(path: Path, fd: int) -> Segment:
    """A claimed segment as its frames say; a torn tail is cut off."""
    seg = Segment(path, fd, writing=False)
    ends: list[int] = []  # offset after each record
    size = os.fstat(fd).st_size
    for kind, payload, after in _frames(fd, 0, size):
        if kind == RECORD:
            ends.append(after)
        elif kind == ACK and len(payload) == _ACK.size:
            seg.delivered = max(seg.delivered, _ACK.unpack(payload)[0])
        seg.size = after
    if seg.size < size:
        log.warning("audit spool: torn tail cut off", extra={"fields": {"path": str(path), "bytes": size - seg.size}})
        os.ftruncate(fd, seg.size)
    seg.appended = len(ends)
    seg.delivered = min(seg.delivered, seg.appended)
    seg.read_at = ends[seg.delivered - 1] if seg.delivered else 0
    return seg


def _lock(path: Path) -> int | None:
    """``path`` opened and exclusively locked, or None when a live process holds it or
    it was deleted meanwhile (by the gateway that delivered it)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            return fd
    except (BlockingIOError, FileNotFoundError):
        pass
    os.close(fd)
    return None


class Spool:
    """This process's segments plus those it claimed, oldest first."""

    def __init__(self, folder: Path, *, fsync: bool = True, segment_bytes: int = 8 << 20) -> None:
        self.folder = folder
        self._fsync = fsync
        self._segment_bytes = segment_bytes
        self._segments: list[Segment] = []
        self._active: Segment | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._dirty: set[Segment] = set()
        self._new_entry = False  # a segment was created: the folder needs an fsync too
        self._syncing: set[Segment] = set()
        self._committer: asyncio.Task[None] | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="audit-spool")

    @property
    def undelivered(self) -> int:
        return sum(s.appended - s.delivered for s in self._segments)

    def claim(self) -> int:
        """Takes over the segments of gateways that are gone; returns their undelivered records."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        claimed = []
        for path in sorted(self.folder.glob("*.wal")):
            fd = _lock(path)
            if fd is None:
                continue
            seg = _scan(path, fd)
            if seg.delivered < seg.appended:
                claimed.append(seg)
            else:
                self._retire(seg)
        self._segments[:0] = claimed  # before any record this process wrote already
        return sum(s.appended - s.delivered for s in claimed) + self._adopt_batch_files()

    def _adopt_batch_files(self) -> int:
        """Batch files (``*.pb``) that gateways before the spool wrote at shutdown: their
        records move into this process's segment, then the files go."""
        adopted = 0
        for path in sorted(self.folder.glob("*.pb")):
            claimed = path.with_suffix(f".claimed-{os.getpid()}")
            try:
                path.rename(claimed)  # atomic: one gateway adopts each file
            except FileNotFoundError:
                continue
            seg = self._writable()
            for rec in security_pb2.AppendAuditBatchRequest.FromString(claimed.read_bytes()).records:
                seg.write(_frame(RECORD, security_pb2.AppendAuditBatchRequest(records=[rec]).SerializeToString()))
                seg.appended += 1
                adopted += 1
            _sync(self.folder, [seg.fd])
            claimed.unlink()
        return adopted

    def _open(self) -> Segment:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.folder / f"{time.time_ns():020d}-{os.getpid()}.wal"
        staged = path.with_suffix(".new")  # locked before it has the name claimers look for
        fd = os.open(staged, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(staged, path)
        self._new_entry = True
        seg = Segment(path, fd)
        self._segments.append(seg)
        return seg

    def _writable(self) -> Segment:
        seg = self._active
        if seg is None or seg.size >= self._segment_bytes:
            if seg is not None:
                self._stop_writing(seg)
            seg = self._active = self._open()
        return seg

    def append(self, payload: bytes) -> asyncio.Future[None]:
        """Writes one record; the future is done once it is on disk (fsynced)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            seg = self._writable()
            seg.write(_frame(RECORD, payload))
        except OSError as e:
            log.error("audit spool: write failed", extra={"fields": {"error": str(e)}})
            done.set_exception(Unavailable("audit log unavailable; call not recorded", retry_after_s=1.0))
            return done
        seg.appended += 1
        if not self._fsync:
            done.set_result(None)
            return done
        self._waiters.append(done)
        self._dirty.add(seg)
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit())
        return done

    async def _commit(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiters:
            waiters, self._waiters = self._waiters, []
            self._syncing, self._dirty = self._dirty, set()
            new_entry, self._new_entry = self._new_entry, False
            fds = [s.fd for s in self._syncing]
            try:
                await loop.run_in_executor(self._thread, _sync, self.folder if new_entry else None, fds)
            except OSError as e:
                # What a failed fsync left on disk is unknown: answer the calls with an
                # error and write the next records to a fresh segment.
                log.error("audit spool: fsync failed", extra={"fields": {"error": str(e)}})
                if self._active in self._syncing:
                    self._stop_writing(self._active)
                error = Unavailable("audit log unavailable; call not recorded", retry_after_s=1.0)
                for w in waiters:
                    if not w.done():
                        w.set_exception(error)
            else:
                for w in waiters:
                    if not w.done():  # the call may have been cancelled meanwhile
                        w.set_result(None)
            finally:
                syncing, self._syncing = self._syncing, set()
                for s in syncing:
                    if s.retired:
                        os.close(s.fd)

    def _stop_writing(self, seg: Segment) -> None:
        seg.writing = False
        if self._active is seg:
            self._active = None
        if seg.delivered == seg.appended:
            self._retire(seg)

    def _retire(self, seg: Segment) -> None:
        """Deletes a fully delivered segment (the name first, so that no claimer that
        opened it before can take it for an orphan), then releases its lock."""
        with contextlib.suppress(FileNotFoundError):
            seg.path.unlink()
        if seg in self._segments:
            self._segments.remove(seg)
        self._dirty.discard(seg)  # delivered already: no fsync needed
        if seg in self._syncing:
            seg.retired = True  # the commit thread still uses the descriptor
        else:
            os.close(seg.fd)

    def next_batch(self, limit: int) -> tuple[Segment, list[bytes], int] | None:
        """Up to ``limit`` undelivered records of the oldest segment that has some, and
        the offset after the last of them."""
        for seg in self._segments:
            if seg.delivered >= seg.appended:
                continue
            records: list[bytes] = []
            end = seg.read_at
            for kind, payload, after in _frames(seg.fd, seg.read_at, seg.size):
                if kind == RECORD:
                    records.append(payload)
                    end = after
                    if len(records) == limit:
                        break
            if records:
                return seg, records, end
        return None

    def delivered(self, seg: Segment, count: int, end: int) -> None:
        """The security service took ``count`` more records of ``seg``, up to ``end``."""
        seg.delivered += count
        seg.read_at = end
        if not seg.writing and seg.delivered == seg.appended:
            self._retire(seg)
            return
        try:  # not fsynced: a lost acknowledgement only means those records are sent again
            seg.write(_frame(ACK, _ACK.pack(seg.delivered)))
        except OSError as e:
            log.warning("audit spool: acknowledgement not written", extra={"fields": {"error": str(e)}})

    async def close(self) -> None:
        """Waits for the last commit; deletes what is delivered, releases the rest."""
        if self._committer is not None:
            with contextlib.suppress(Exception):
                await self._committer
        for seg in list(self._segments):
            seg.writing = False
            if seg.delivered == seg.appended:
                self._retire(seg)
            else:
                os.close(seg.fd)  # the lock goes with it: the next gateway claims the segment
        self._segments.clear()
        self._active = None
        self._thread.shutdown()


def _sync(folder: Path | None, fds: list[int]) -> None:
    if folder is not None:
        fsync_dir(folder)
    for fd in fds:
        os.fdatasync(fd)


def spool_backlog(folder: Path) -> dict[str, tuple[int, int]]:
    """Per spool file in ``folder``: (records written, records delivered), running
    gateways' files included. For reports; takes no lock."""
    backlog: dict[str, tuple[int, int]] = {}
    for path in folder.glob("*.wal") if folder.is_dir() else ():
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            records, acked = 0, 0
            for kind, payload, _ in _frames(fd, 0, os.fstat(fd).st_size):
                if kind == RECORD:
                    records += 1
                elif kind == ACK and len(payload) == _ACK.size:
                    acked = max(acked, _ACK.unpack(payload)[0])
            backlog[path.name] = (records, acked)
        finally:
            os.close(fd)
    return backlog


def spooled_records(folder: Path) -> int:
    """Records in ``folder`` not yet delivered to the security service (of running
    gateways too: theirs are at most a flush interval old)."""
    return sum(max(0, records - acked) for records, acked in spool_backlog(folder).values())


def stranded_records(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> int:
    """Records spooled at ``before`` and still undelivered at ``after`` (a file gone by then
    was fully delivered). Taken a few flush intervals apart, this tells records that are
    stuck from the ones a live gateway is about to deliver."""
    return sum(max(0, records - after[name][1]) for name, (records, _) in before.items() if name in after)


class AuditSink:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        identity: InternalIdentity,
        *,
        spool_dir: Path,
        batch: int = 200,
        interval_s: float = 0.5,
        fsync: bool = True,
    ) -> None:
        # The records are sent as the bytes the spool holds (a batch is their concatenation).
        self._append: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(APPEND_BATCH)
        self._identity = identity
        self._batch = batch
        self._interval_s = interval_s
        self.spool = Spool(spool_dir, fsync=fsync)
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()  # one delivery at a time: each batch is sent once
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        claimed = self.spool.claim()
        if claimed:
            log.warning("audit: delivering records a previous gateway spooled", extra={"fields": {"records": claimed}})
            self._wake.set()  # now, not at the next tick
        self._task = asyncio.create_task(self._run())

    def record(self, rec: security_pb2.AppendAuditRequest) -> Awaitable[None]:
        """Spools one record; await the result before the call's response is released
        (it raises ``Unavailable`` when the spool cannot take the record)."""
        done = self.spool.append(security_pb2.AppendAuditBatchRequest(records=[rec]).SerializeToString())
        if self.spool.undelivered >= self._batch:
            self._wake.set()
        return done

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval_s)
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # keep delivering: a failed tick is retried on the next
                log.exception("audit flush failed")

    async def flush(self, timeout_s: float = 10.0) -> bool:
        """Delivers every spooled record; False when the security service did not take
        them (they stay spooled and are retried on the next tick)."""
        async with self._flushing:
            return await self._deliver(timeout_s)

    async def _deliver(self, timeout_s: float) -> bool:
        while (batch := self.spool.next_batch(self._batch)) is not None:
            seg, records, end = batch
            md = ((IDENTITY_KEY, self._identity.mint(GATEWAY)),)
            try:
                await self._append(b"".join(records), metadata=md, timeout=timeout_s)
            except grpc.aio.AioRpcError as e:
                log.warning(
                    "audit flush failed", extra={"fields": {"code": e.code().name, "pending": self.spool.undelivered}}
                )
                return False
            self.spool.delivered(seg, len(records), end)
        return True

    @property
    def pending(self) -> int:
        return self.spool.undelivered

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task  # no flush of its own still running beside the last one
        if not await self.flush(timeout_s=5.0):  # bounded: the process is being asked to stop
            log.error(
                "audit: security service unreachable at shutdown; records stay spooled for the next gateway",
                extra={"fields": {"records": self.spool.undelivered, "spool": str(self.spool.folder)}},
            )
        await self.spool.close()
