"""Peer channels retry UNAVAILABLE per the service config and carry deadlines."""

from __future__ import annotations

import grpc
import pytest

from llmesh.pb.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from llmesh.runtime.channels import peer_channel


class Flaky(embedding_pb2_grpc.EmbeddingServicer):
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.deadlines: list[float | None] = []

    async def EmbedText(self, request, context):
        self.calls += 1
        self.deadlines.append(context.time_remaining())
        if self.calls <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return embedding_pb2.EmbedResponse(model="text", dimension=1)


async def _serve(servicer: Flaky) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    embedding_pb2_grpc.add_EmbeddingServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def test_unavailable_is_retried_until_success() -> None:
    flaky = Flaky(failures=2)  # type: ignore[abstract]  # serves one RPC; grpc answers UNIMPLEMENTED for the rest
    server, port = await _serve(flaky)
    try:
        channel = peer_channel(f"127.0.0.1:{port}")
        resp = await embedding_pb2_grpc.EmbeddingStub(channel).EmbedText(
            embedding_pb2.EmbedTextRequest(texts=["x"]), timeout=10
        )
        assert resp.model == "text" and flaky.calls == 3
        assert all(d is not None and d < 11 for d in flaky.deadlines)  # the deadline travelled with each attempt
        await channel.close()
    finally:
        await server.stop(None)


async def test_retries_are_bounded() -> None:
    flaky = Flaky(failures=100)  # type: ignore[abstract]  # serves one RPC; grpc answers UNIMPLEMENTED for the rest
    server, port = await _serve(flaky)
    try:
        channel = peer_channel(f"127.0.0.1:{port}")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await embedding_pb2_grpc.EmbeddingStub(channel).EmbedText(embedding_pb2.EmbedTextRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and flaky.calls == 4
        await channel.close()
    finally:
        await server.stop(None)
