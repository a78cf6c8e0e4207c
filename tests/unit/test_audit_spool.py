"""The gateway's audit spool: group commit, crash recovery (a real SIGKILL), torn
tails, acknowledgements, and delivery to a security service on loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from llmesh.pb.security.v1 import security_pb2 as spb
from llmesh.runtime.identity import InternalIdentity
from llmesh.services.gateway import audit
from llmesh.services.gateway.audit import AuditSink, Spool, spooled_records, stranded_records
from llmesh.services.gateway.proxy import Context


def _rec(i: int) -> spb.AppendAuditRequest:
    return spb.AppendAuditRequest(actor=f"a{i}", action="/x.v1.X/Y", resource="x.v1.X", outcome="OK")


def _payload(i: int) -> bytes:
    return spb.AppendAuditBatchRequest(records=[_rec(i)]).SerializeToString()


def _drain(spool: Spool) -> list[str]:
    """What a delivery would send, acknowledged as if the security service took it."""
    actors = []
    while (batch := spool.next_batch(7)) is not None:
        seg, records, end = batch
        actors += [r.actor for r in spb.AppendAuditBatchRequest.FromString(b"".join(records)).records]
        spool.delivered(seg, len(records), end)
    return actors


async def test_records_of_concurrent_calls_share_an_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    syncs: list[int] = []
    real = audit._sync

    def counted(folder: Path | None, fds: list[int]) -> None:
        syncs.append(len(fds))
        real(folder, fds)

    monkeypatch.setattr(audit, "_sync", counted)
    spool = Spool(tmp_path)
    await asyncio.gather(*(spool.append(_payload(i)) for i in range(500)))
    assert 1 <= len(syncs) <= 3  # one commit for everything written before it started
    assert spool.undelivered == 500
    assert _drain(spool) == [f"a{i}" for i in range(500)]
    await spool.close()
    assert not list(tmp_path.iterdir())  # delivered and no longer written: deleted


def test_records_survive_sigkill_and_the_next_claim_delivers_them_once(tmp_path: Path) -> None:
    child = textwrap.dedent(
        f"""
        import asyncio, os, sys
        from pathlib import Path
        from llmesh.pb.security.v1 import security_pb2 as spb
        from llmesh.services.gateway.audit import Spool

        async def main():
            spool = Spool(Path({str(tmp_path)!r}))
            for i in range(30):
                await spool.append(spb.AppendAuditBatchRequest(records=[spb.AppendAuditRequest(actor=f"a{{i}}")]).SerializeToString())
            seg, records, end = spool.next_batch(10)
            spool.delivered(seg, len(records), end)  # the first 10 reached the security service
            print("ready", flush=True)
            await asyncio.sleep(60)

        asyncio.run(main())
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        live = Spool(tmp_path)
        assert live.claim() == 0  # a live gateway's segment is not taken
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert spooled_records(tmp_path) == 20
    spool = Spool(tmp_path)
    assert spool.claim() == 20
    assert Spool(tmp_path).claim() == 0  # claimed once
    assert _drain(spool) == [f"a{i}" for i in range(10, 30)]
    assert not list(tmp_path.glob("*.wal"))


async def test_a_torn_tail_is_cut_off_and_later_frames_still_count(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for i in range(3):
        await spool.append(_payload(i))
    [seg] = spool._segments
    os.write(seg.fd, audit._frame(audit.RECORD, _payload(3))[:-4])  # a write the crash cut short
    os.close(seg.fd)  # as a killed process leaves it
    again = Spool(tmp_path)
    assert again.claim() == 3
    [claimed] = again._segments
    again.delivered(claimed, 0, claimed.read_at)  # an acknowledgement lands after the cut
    assert spooled_records(tmp_path) == 3
    assert _drain(again) == ["a0", "a1", "a2"]


async def test_a_full_segment_is_rotated_and_deleted_once_delivered(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=100)
    for i in range(6):
        await spool.append(_payload(i))
    assert len(list(tmp_path.glob("*.wal"))) > 1
    assert _drain(spool) == [f"a{i}" for i in range(6)]
    assert len(list(tmp_path.glob("*.wal"))) == 1  # the one still written to


async def test_batch_files_of_the_previous_release_are_adopted(tmp_path: Path) -> None:
    (tmp_path / "1-2.pb").write_bytes(spb.AppendAuditBatchRequest(records=[_rec(1), _rec(2)]).SerializeToString())
    spool = Spool(tmp_path)
    assert spool.claim() == 2
    assert not list(tmp_path.glob("*.pb*"))
    assert _drain(spool) == ["a1", "a2"]
    await spool.close()


class _Security:
    """AppendAuditBatch only, as the security service answers it."""

    def __init__(self) -> None:
        self.actors: list[str] = []
        self.down = False

    async def append(self, request: spb.AppendAuditBatchRequest, context: Context) -> spb.AppendAuditBatchResponse:
        if self.down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "down")
        self.actors += [r.actor for r in request.records]
        return spb.AppendAuditBatchResponse()


@pytest.fixture
async def security() -> AsyncIterator[tuple[_Security, grpc.aio.Channel]]:
    server = grpc.aio.server()
    servicer = _Security()
    handler = grpc.unary_unary_rpc_method_handler(
        servicer.append,
        request_deserializer=spb.AppendAuditBatchRequest.FromString,
        response_serializer=spb.AppendAuditBatchResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("llmesh.security.v1.Security", {"AppendAuditBatch": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield servicer, channel
    await channel.close()
    await server.stop(0)


async def test_sink_delivers_in_order_and_spools_what_it_cannot(
    tmp_path: Path, security: tuple[_Security, grpc.aio.Channel]
) -> None:
    servicer, channel = security
    identity = InternalIdentity(os.urandom(32))
    sink = AuditSink(channel, identity, spool_dir=tmp_path, batch=4, interval_s=3600)
    sink.start()
    await asyncio.gather(*(sink.record(_rec(i)) for i in range(10)))
    assert await sink.flush()
    assert servicer.actors == [f"a{i}" for i in range(10)] and sink.pending == 0
    servicer.down = True
    for i in range(10, 13):
        await sink.record(_rec(i))
    await sink.close()  # the security service refuses: the records stay on disk
    assert spooled_records(tmp_path) == 3
    servicer.down = False
    nxt = AuditSink(channel, identity, spool_dir=tmp_path, interval_s=3600)
    nxt.start()
    await nxt.close()
    assert servicer.actors == [f"a{i}" for i in range(13)]
    assert not list(tmp_path.iterdir())


def test_stranded_records_are_those_still_undelivered_later() -> None:
    # a: 3 written, 1 delivered → later 3 delivered (in flight, not stranded); b: gone (delivered).
    assert stranded_records({"a": (3, 1), "b": (2, 0)}, {"a": (5, 3)}) == 0
    # c: 4 written → later only 2 delivered: 2 stranded (records written since do not count).
    assert stranded_records({"c": (4, 0)}, {"c": (9, 2)}) == 2
