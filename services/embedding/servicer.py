"""Embedding servicer: the contract of ``llmesh.embedding.v1.Embedding`` served for
real (health, reflection, the gateway's routes, the identity check), every RPC
answering UNIMPLEMENTED until the embedding models land."""

from __future__ import annotations

from typing import Any

import grpc

from llmesh.pb.embedding.v1 import embedding_pb2 as pb
from llmesh.pb.embedding.v1 import embedding_pb2_grpc as pb_grpc
from llmesh.runtime.errors import Unimplemented

SERVICE = pb.DESCRIPTOR.services_by_name["Embedding"]
Context = grpc.aio.ServicerContext[Any, Any]


def _pending(method: str) -> Unimplemented:
    return Unimplemented(
        f"{SERVICE.full_name}/{method} is not implemented yet: the embedding service runs, its models are not served"
    )


class EmbeddingServicer(pb_grpc.EmbeddingServicer):
    async def EmbedText(self, request: pb.EmbedTextRequest, context: Context) -> pb.EmbedResponse:
        raise _pending("EmbedText")

    async def EmbedImage(self, request: pb.EmbedImageRequest, context: Context) -> pb.EmbedResponse:
        raise _pending("EmbedImage")

    async def Similarity(self, request: pb.SimilarityRequest, context: Context) -> pb.SimilarityResponse:
        raise _pending("Similarity")

    async def ListEmbeddingModels(
        self, request: pb.ListEmbeddingModelsRequest, context: Context
    ) -> pb.ListEmbeddingModelsResponse:
        raise _pending("ListEmbeddingModels")
