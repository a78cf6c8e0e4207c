"""The gateway's generic proxy against an in-process upstream: all four RPC shapes,
deadlines, cancellation, metadata and upstream errors pass through unchanged."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from llmesh.client import describe_error
from llmesh.pb.inference.v1 import inference_pb2 as ipb
from llmesh.pb.inference.v1 import inference_pb2_grpc as igrpc
from llmesh.pb.retrieval.v1 import retrieval_pb2 as rpb
from llmesh.pb.retrieval.v1 import retrieval_pb2_grpc as rgrpc
from llmesh.runtime.errors import InvalidArgument, ResourceExhausted
from llmesh.runtime.interceptors import ErrorMappingInterceptor
from llmesh.services.gateway.proxy import Forward, ProxyHandler, Upstreams, forwardable
from llmesh.services.gateway.routes import build_routes


class Inference(igrpc.InferenceServicer):
    def __init__(self) -> None:
        self.seen: dict[str, object] = {}
        self.stream_cancelled = asyncio.Event()

    async def Generate(self, request, context):  # type: ignore[no-untyped-def]
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

    async def GenerateStream(self, request, context):  # type: ignore[no-untyped-def]
        try:
            for i in range(1000):
                yield ipb.GenerateStreamResponse(text_delta=str(i))
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.stream_cancelled.set()
            raise

    async def Converse(self, request_iterator, context):  # type: ignore[no-untyped-def]
        async for req in request_iterator:
            yield ipb.ChatStreamResponse(conversation_id="c", text_delta=req.message[::-1])


class Retrieval(rgrpc.RetrievalServicer):
    async def Ingest(self, request_iterator, context):  # type: ignore[no-untyped-def]
        header, size = None, 0
        async for part in request_iterator:
            if part.HasField("header"):
                header = part.header
            else:
                size += len(part.data)
        return rpb.IngestResponse(document_id=header.document_id if header else "", chunks=size)


@pytest.fixture
async def mesh():  # type: ignore[no-untyped-def]
    inference = Inference()
    upstream = grpc.aio.server(interceptors=[ErrorMappingInterceptor()])
    igrpc.add_InferenceServicer_to_server(inference, upstream)
    rgrpc.add_RetrievalServicer_to_server(Retrieval(), upstream)
    up_port = upstream.add_insecure_port("127.0.0.1:0")
    await upstream.start()

    address = f"127.0.0.1:{up_port}"
    routes = build_routes({"llmesh.inference.v1.Inference": address, "llmesh.retrieval.v1.Retrieval": address})
    upstreams = Upstreams([address], 16 * 1024 * 1024)

    async def admit(route, context, body):  # type: ignore[no-untyped-def]
        gate = None
        if "x-refuse" in dict(context.invocation_metadata()):  # a check that fails after the call started

            async def refuse() -> None:
                await asyncio.sleep(0.05)
                raise ResourceExhausted("over the limit", retry_after_s=1)

            gate = asyncio.ensure_future(refuse())
        return Forward(forwardable(context.invocation_metadata()), gate=gate)

    gateway = grpc.aio.server(interceptors=[aio_server_interceptor(), ErrorMappingInterceptor()])
    gateway.add_generic_rpc_handlers([ProxyHandler(routes, upstreams, admit, default_timeout_s=30)])
    gw_port = gateway.add_insecure_port("127.0.0.1:0")
    await gateway.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gw_port}")
    yield inference, channel
    await channel.close()
    await gateway.stop(None)
    await upstreams.close()
    await upstream.stop(None)


async def test_unary_with_metadata_and_deadline(mesh) -> None:  # type: ignore[no-untyped-def]
    inference, channel = mesh
    resp = await igrpc.InferenceStub(channel).Generate(
        ipb.GenerateRequest(prompt="hi"), timeout=5, metadata=(("x-custom", "v"), ("authorization", "Bearer t"))
    )
    assert resp.text == "HI"
    assert inference.seen["custom"] == "v"
    assert inference.seen["auth"] is None  # credentials stop at the gateway
    assert 0 < inference.seen["deadline"] < 5.5  # the caller's deadline travelled


async def test_trace_context_reaches_upstream(mesh) -> None:  # type: ignore[no-untyped-def]
    inference, channel = mesh
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    await igrpc.InferenceStub(channel).Generate(
        ipb.GenerateRequest(prompt="hi"), timeout=5, metadata=(("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),)
    )
    assert inference.seen["traceparent"].split("-")[1] == trace_id  # same trace, the gateway's span as parent


async def test_upstream_error_and_rich_details_pass_through(mesh) -> None:  # type: ignore[no-untyped-def]
    _, channel = mesh
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await igrpc.InferenceStub(channel).Generate(ipb.GenerateRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert describe_error(e.value).field == "prompt"


async def test_server_streaming_and_cancellation_reach_upstream(mesh) -> None:  # type: ignore[no-untyped-def]
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


async def test_client_streaming(mesh) -> None:  # type: ignore[no-untyped-def]
    _, channel = mesh

    async def parts() -> AsyncIterator[rpb.IngestRequest]:
        yield rpb.IngestRequest(header=rpb.DocumentHeader(collection="c", document_id="doc-1"))
        for _ in range(3):
            yield rpb.IngestRequest(data=b"x" * 100)

    resp = await rgrpc.RetrievalStub(channel).Ingest(parts(), timeout=5)
    assert (resp.document_id, resp.chunks) == ("doc-1", 300)


async def test_bidi_streaming(mesh) -> None:  # type: ignore[no-untyped-def]
    _, channel = mesh

    async def turns() -> AsyncIterator[ipb.ChatRequest]:
        for m in ("abc", "hello"):
            yield ipb.ChatRequest(message=m)

    replies = [r.text_delta async for r in igrpc.InferenceStub(channel).Converse(turns(), timeout=5)]
    assert replies == ["cba", "olleh"]


async def test_unrouted_and_unimplemented_methods(mesh) -> None:  # type: ignore[no-untyped-def]
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


async def test_a_failed_gate_releases_nothing_and_cancels_upstream(mesh) -> None:  # type: ignore[no-untyped-def]
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
