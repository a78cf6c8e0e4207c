"""The gateway's generic proxy against an in-process upstream: all four RPC shapes,
deadlines, cancellation, metadata and upstream errors pass through unchanged; bytes
that are not a valid request are refused with INVALID_ARGUMENT, at the gateway and at
a service (the shared runtime's interceptor chain), in every shape, promptly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from llmesh.client import describe_error
from llmesh.pb.inference.v1 import inference_pb2 as ipb
from llmesh.pb.inference.v1 import inference_pb2_grpc as igrpc
from llmesh.pb.retrieval.v1 import retrieval_pb2 as rpb
from llmesh.pb.retrieval.v1 import retrieval_pb2_grpc as rgrpc
from llmesh.runtime.decoding import MalformedRequest, parse
from llmesh.runtime.errors import InvalidArgument, ResourceExhausted
from llmesh.runtime.interceptors import ErrorMappingInterceptor
from llmesh.services.gateway.proxy import Forward, ProxyHandler, Upstreams, forwardable
from llmesh.services.gateway.routes import build_routes


class Inference(igrpc.InferenceServicer):
    def __init__(self) -> None:
        self.seen: dict[str, object] = {}
        self.stream_cancelled = asyncio.Event()
        self.converse_ended = asyncio.Event()
        self.calls = 0

    async def Generate(self, request, context):
        self.calls += 1
        if not request.prompt:
            raise InvalidArgument("prompt", "must not be empty")
        md = dict(context.invocation_metadata())
        self.seen.update(
            deadline=context.time_remaining(),
            custom=md.get("x-custom"),
            auth=md.get("authorization"),
            traceparent=md.get("traceparent"),
        )
        return ipb.GenerateResponse(text=request.prompt.upper())

    async def GenerateStream(self, request, context):
        try:
            for i in range(1000):
                yield ipb.GenerateStreamResponse(text_delta=str(i))
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.stream_cancelled.set()
            raise

    async def Converse(self, request_iterator, context):
        try:
            async for req in request_iterator:
                yield ipb.ChatStreamResponse(conversation_id="c", text_delta=req.message[::-1])
        finally:  # a cancelled call ends the request stream here
            self.converse_ended.set()


class Retrieval(rgrpc.RetrievalServicer):
    async def Ingest(self, request_iterator, context):
        header, size = None, 0
        async for part in request_iterator:
            if part.HasField("header"):
                header = part.header
            else:
                size += len(part.data)
        return rpb.IngestResponse(document_id=header.document_id if header else "", chunks=size)


@pytest.fixture
async def mesh():
    inference = Inference()  # type: ignore[abstract]  # only the RPCs the tests call are implemented
    upstream = grpc.aio.server(interceptors=[ErrorMappingInterceptor()])
    igrpc.add_InferenceServicer_to_server(inference, upstream)
    rgrpc.add_RetrievalServicer_to_server(Retrieval(), upstream)  # type: ignore[abstract]  # Ingest only
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), upstream)
    up_port = upstream.add_insecure_port("127.0.0.1:0")
    await upstream.start()

    address = f"127.0.0.1:{up_port}"
    routes = build_routes({"llmesh.inference.v1.Inference": address, "llmesh.retrieval.v1.Retrieval": address})
    upstreams = Upstreams([address], 16 * 1024 * 1024)
    outcomes: list[grpc.StatusCode] = []  # what the gateway's audit would record

    async def record(code: grpc.StatusCode, last: bytes | None) -> None:
        outcomes.append(code)

    async def admit(route, context, body):
        gate = None
        if "x-refuse" in dict(context.invocation_metadata()):  # a check that fails after the call started

            async def refuse() -> None:
                await asyncio.sleep(0.05)
                raise ResourceExhausted("over the limit", retry_after_s=1)

            gate = asyncio.ensure_future(refuse())
        return Forward(forwardable(context.invocation_metadata()), done=record, gate=gate)

    gateway = grpc.aio.server(interceptors=[aio_server_interceptor(), ErrorMappingInterceptor()])
    gateway.add_generic_rpc_handlers([ProxyHandler(routes, upstreams, admit, default_timeout_s=30)])
    gw_port = gateway.add_insecure_port("127.0.0.1:0")
    await gateway.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gw_port}")
    direct = grpc.aio.insecure_channel(address)
    inference.outcomes = outcomes  # type: ignore[attr-defined]  # the tests read the gateway's outcomes here
    inference.direct = direct  # type: ignore[attr-defined]  # and call the upstream around the gateway
    yield inference, channel
    await direct.close()
    await channel.close()
    await gateway.stop(None)
    await upstreams.close()
    await upstream.stop(None)


async def test_unary_with_metadata_and_deadline(mesh) -> None:
    inference, channel = mesh
    resp = await igrpc.InferenceStub(channel).Generate(
        ipb.GenerateRequest(prompt="hi"), timeout=5, metadata=(("x-custom", "v"), ("authorization", "Bearer t"))
    )
    assert resp.text == "HI"
    assert inference.seen["custom"] == "v"
    assert inference.seen["auth"] is None  # credentials stop at the gateway
    assert 0 < inference.seen["deadline"] < 5.5  # the caller's deadline travelled


async def test_trace_context_reaches_upstream(mesh) -> None:
    inference, channel = mesh
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    await igrpc.InferenceStub(channel).Generate(
        ipb.GenerateRequest(prompt="hi"), timeout=5, metadata=(("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),)
    )
    assert inference.seen["traceparent"].split("-")[1] == trace_id  # same trace, the gateway's span as parent


async def test_upstream_error_and_rich_details_pass_through(mesh) -> None:
    _, channel = mesh
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await igrpc.InferenceStub(channel).Generate(ipb.GenerateRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert describe_error(e.value).field == "prompt"


async def test_server_streaming_and_cancellation_reach_upstream(mesh) -> None:
    inference, channel = mesh
    call = igrpc.InferenceStub(channel).GenerateStream(ipb.GenerateRequest(prompt="x"), timeout=10)
    got = []
    async for msg in call:
        got.append(msg.text_delta)
        if len(got) == 3:
            call.cancel()
            break
    assert got == ["0", "1", "2"]
    await asyncio.wait_for(inference.stream_cancelled.wait(), 5)


async def test_client_streaming(mesh) -> None:
    _, channel = mesh

    async def parts() -> AsyncIterator[rpb.IngestRequest]:
        yield rpb.IngestRequest(header=rpb.DocumentHeader(collection="c", document_id="doc-1"))
        for _ in range(3):
            yield rpb.IngestRequest(data=b"x" * 100)

    resp = await rgrpc.RetrievalStub(channel).Ingest(parts(), timeout=5)
    assert (resp.document_id, resp.chunks) == ("doc-1", 300)


async def test_bidi_streaming(mesh) -> None:
    _, channel = mesh

    async def turns() -> AsyncIterator[ipb.ChatRequest]:
        for m in ("abc", "hello"):
            yield ipb.ChatRequest(message=m)

    replies = [r.text_delta async for r in igrpc.InferenceStub(channel).Converse(turns(), timeout=5)]
    assert replies == ["cba", "olleh"]


async def test_unrouted_and_unimplemented_methods(mesh) -> None:
    _, channel = mesh
    # Routed but not implemented upstream: the upstream's UNIMPLEMENTED comes back.
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await rgrpc.RetrievalStub(channel).Search(rpb.SearchRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # Not routed at all (no upstream configured for the trainer).
    from llmesh.pb.trainer.v1 import trainer_pb2, trainer_pb2_grpc

    with pytest.raises(grpc.aio.AioRpcError) as e:
        await trainer_pb2_grpc.TrainerStub(channel).GetJob(trainer_pb2.GetJobRequest(job_id="j"), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_a_failed_gate_releases_nothing_and_cancels_upstream(mesh) -> None:
    inference, channel = mesh
    stub = igrpc.InferenceStub(channel)
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async for m in stub.GenerateStream(ipb.GenerateRequest(prompt="x"), timeout=5, metadata=(("x-refuse", "1"),)):
            got.append(m)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and got == []
    await asyncio.wait_for(inference.stream_cancelled.wait(), 5)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Generate(ipb.GenerateRequest(prompt="x"), timeout=5, metadata=(("x-refuse", "1"),))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# Bodies that no message type accepts: truncated length, over-long varint, unterminated
# group, a field number of 0, invalid UTF-8 in string field 1 (a string in every request
# used here).
MALFORMED = [b"\x0a\x05ab", b"\x08" + b"\xff" * 10 + b"\x01", b"\x0b", b"\x00\x01", b"\x0a\x02\xff\xfe"]
GENERATE = "/llmesh.inference.v1.Inference/Generate"
CONVERSE = "/llmesh.inference.v1.Inference/Converse"
INGEST = "/llmesh.retrieval.v1.Retrieval/Ingest"


def test_parse_names_the_type_and_no_python_class() -> None:
    assert parse(ipb.GenerateRequest, ipb.GenerateRequest(prompt="x").SerializeToString()).prompt == "x"
    for body in MALFORMED:
        with pytest.raises(MalformedRequest) as e:
            parse(ipb.GenerateRequest, body)
        assert e.value.message == "request body is not a valid llmesh.inference.v1.GenerateRequest"


def _refused(err: grpc.aio.AioRpcError, type_name: str) -> None:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert err.details() == f"request body is not a valid {type_name}"
    details = dict(err.trailing_metadata() or ())["grpc-status-details-bin"]
    infos = [d for d in status_pb2.Status.FromString(details).details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    assert info.reason == "MALFORMED_REQUEST" and info.metadata["type"] == type_name


@pytest.mark.parametrize("via", ["gateway", "service"])
async def test_malformed_unary_is_refused_before_the_servicer(mesh, via: str) -> None:
    inference, channel = mesh
    rpc = (channel if via == "gateway" else inference.direct).unary_unary(GENERATE)
    for body in MALFORMED:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await rpc(body, timeout=5)
        _refused(e.value, "llmesh.inference.v1.GenerateRequest")
    assert inference.calls == 0
    if via == "gateway":  # refused calls are audited with their status
        assert inference.outcomes == [grpc.StatusCode.INVALID_ARGUMENT] * len(MALFORMED)


@pytest.mark.parametrize("via", ["gateway", "service"])
async def test_malformed_server_streaming_request_is_refused(mesh, via: str) -> None:
    inference, channel = mesh
    call = (channel if via == "gateway" else inference.direct).unary_stream(
        "/llmesh.inference.v1.Inference/GenerateStream"
    )(b"\x0b", timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async for _ in call:
            pass
    _refused(e.value, "llmesh.inference.v1.GenerateRequest")


@pytest.mark.parametrize("via", ["gateway", "service"])
@pytest.mark.parametrize("position", [0, 1])
async def test_a_malformed_bidi_message_ends_the_call_promptly(mesh, via: str, position: int) -> None:
    inference, channel = mesh
    good = ipb.ChatRequest(message="abc").SerializeToString()
    answered = asyncio.Event()
    release = asyncio.Event()  # the client keeps its side open: only the refusal may end the call

    async def turns() -> AsyncIterator[bytes]:
        if position:  # a good turn, answered, then a bad one
            yield good
            await answered.wait()
        yield b"\x0a\x05ab"
        await release.wait()

    started = time.monotonic()
    call = (channel if via == "gateway" else inference.direct).stream_stream(CONVERSE)(turns(), timeout=30)
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async for reply in call:
            got.append(reply)
            answered.set()
    release.set()
    _refused(e.value, "llmesh.inference.v1.ChatRequest")
    assert time.monotonic() - started < 5  # not the deadline
    assert len(got) == position
    if via == "gateway" and position:  # the upstream call the gateway had opened is over too
        await asyncio.wait_for(inference.converse_ended.wait(), 5)


@pytest.mark.parametrize("via", ["gateway", "service"])
async def test_a_malformed_client_stream_message_is_refused(mesh, via: str) -> None:
    inference, channel = mesh
    release = asyncio.Event()

    async def parts() -> AsyncIterator[bytes]:
        yield rpb.IngestRequest(header=rpb.DocumentHeader(collection="c", document_id="d")).SerializeToString()
        yield b"\x12\x05ab"  # data: truncated
        await release.wait()

    with pytest.raises(grpc.aio.AioRpcError) as e:
        await (channel if via == "gateway" else inference.direct).stream_unary(INGEST)(parts(), timeout=30)
    release.set()
    _refused(e.value, "llmesh.retrieval.v1.IngestRequest")
    if via == "gateway":
        assert inference.outcomes == [grpc.StatusCode.INVALID_ARGUMENT]


async def test_health_refuses_malformed_requests_too(mesh) -> None:
    inference, _ = mesh
    check = inference.direct.unary_unary("/grpc.health.v1.Health/Check")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await check(b"\x0a\x02\xff\xfe", timeout=5)
    _refused(e.value, "grpc.health.v1.HealthCheckRequest")
    ok = await check(health_pb2.HealthCheckRequest().SerializeToString(), timeout=5)
    assert health_pb2.HealthCheckResponse.FromString(ok).status == health_pb2.HealthCheckResponse.SERVING


class Swallowing(rgrpc.RetrievalServicer):
    """A servicer that catches everything its request stream raises and carries on."""

    async def Ingest(self, request_iterator, context):
        try:
            async for _ in request_iterator:
                pass
        except BaseException:
            await asyncio.sleep(30)  # as a stuck servicer would
        return rpb.IngestResponse()


async def test_a_servicer_that_swallows_the_error_cannot_hold_the_call() -> None:
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()])
    rgrpc.add_RetrievalServicer_to_server(Swallowing(), server)  # type: ignore[abstract]  # Ingest only
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:

            async def parts() -> AsyncIterator[bytes]:
                yield b"\x0b"

            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                ingest: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = ch.stream_unary(INGEST)
                await ingest(parts(), timeout=20)
            _refused(e.value, "llmesh.retrieval.v1.IngestRequest")
            assert time.monotonic() - started < 5
    finally:
        await server.stop(None)
