"""Retrieval servicer: the contract of ``llmesh.retrieval.v1.Retrieval`` served for
real (health, reflection, the gateway's routes, the identity check), every RPC
answering UNIMPLEMENTED until collections, ingestion and search land."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from llmesh.pb.retrieval.v1 import retrieval_pb2 as pb
from llmesh.pb.retrieval.v1 import retrieval_pb2_grpc as pb_grpc
from llmesh.runtime.errors import Unimplemented

SERVICE = pb.DESCRIPTOR.services_by_name["Retrieval"]
Context = grpc.aio.ServicerContext[Any, Any]


def _pending(method: str) -> Unimplemented:
    return Unimplemented(
        f"{SERVICE.full_name}/{method} is not implemented yet: the retrieval service runs, it holds no collections"
    )


def _pending_stream(method: str) -> AsyncIterator[pb.AnswerStreamResponse]:
    # Called inside the handler's first iteration, so a streaming call ends with the status.
    raise _pending(method)


class RetrievalServicer(pb_grpc.RetrievalServicer):
    async def CreateCollection(self, request: pb.CreateCollectionRequest, context: Context) -> pb.Collection:
        raise _pending("CreateCollection")

    async def ListCollections(self, request: pb.ListCollectionsRequest, context: Context) -> pb.ListCollectionsResponse:
        raise _pending("ListCollections")

    async def DeleteCollection(
        self, request: pb.DeleteCollectionRequest, context: Context
    ) -> pb.DeleteCollectionResponse:
        raise _pending("DeleteCollection")

    async def Ingest(self, request_iterator: AsyncIterator[pb.IngestRequest], context: Context) -> pb.IngestResponse:
        # Refused before the body is read: nothing is stored, so nothing is worth receiving.
        raise _pending("Ingest")

    async def Search(self, request: pb.SearchRequest, context: Context) -> pb.SearchResponse:
        raise _pending("Search")

    async def Answer(self, request: pb.AnswerRequest, context: Context) -> pb.AnswerResponse:
        raise _pending("Answer")

    async def AnswerStream(self, request: pb.AnswerRequest, context: Context) -> AsyncIterator[pb.AnswerStreamResponse]:
        async for response in _pending_stream("AnswerStream"):
            yield response
