"""A small synchronous client for the mesh, used by the CLI, the demo and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from llmesh.common.v1 import types_pb2
from llmesh.inference.v1 import inference_pb2 as pb
from llmesh.inference.v1 import inference_pb2_grpc as pb_grpc
from llmesh.runtime.channels import channel_options


@dataclass(frozen=True)
class RpcFailure:
    code: str
    message: str
    field: str = ""
    retry_after_s: float | None = None

    def __str__(self) -> str:
        extra = f" (field {self.field})" if self.field else ""
        if self.retry_after_s is not None:
            extra += f" (retry after {self.retry_after_s:g}s)"
        return f"{self.code}: {self.message}{extra}"


def describe_error(err: grpc.RpcError) -> RpcFailure:
    """Status code, message and the rich details (field, retry delay) of a failed call."""
    code = err.code().name if hasattr(err, "code") else "UNKNOWN"
    message = err.details() if hasattr(err, "details") else str(err)
    field, retry = "", None
    # Sync calls (grpc.Call) and aio errors (AioRpcError) both carry trailing metadata.
    status = rpc_status.from_call(err) if hasattr(err, "trailing_metadata") else None
    for d in status.details if status else ():
        if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            d.Unpack(br)
            field = br.field_violations[0].field if br.field_violations else ""
        elif d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            ri = error_details_pb2.RetryInfo()
            d.Unpack(ri)
            retry = ri.retry_delay.ToTimedelta().total_seconds()
    return RpcFailure(code, message or "", field, retry)


def sampling(*, max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
             top_k: int | None = None, seed: int | None = None, stop: list[str] | None = None) -> types_pb2.SamplingParams:
    s = types_pb2.SamplingParams(stop=stop or [])
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                        ("top_k", top_k), ("seed", seed)):
        if value is not None:
            setattr(s, name, value)
    return s


class InferenceClient:
    def __init__(self, address: str, timeout: float = 120.0) -> None:
        self.channel = grpc.insecure_channel(address, options=channel_options())
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.timeout = timeout

    def generate(self, request: pb.GenerateRequest) -> pb.GenerateResponse:
        return self.stub.Generate(request, timeout=self.timeout)

    def generate_stream(self, request: pb.GenerateRequest) -> Iterator[pb.GenerateStreamResponse]:
        return self.stub.GenerateStream(request, timeout=self.timeout)

    def chat_stream(self, request: pb.ChatRequest) -> Iterator[pb.ChatStreamResponse]:
        return self.stub.ChatStream(request, timeout=self.timeout)

    def close(self) -> None:
        self.channel.close()
