"""A small synchronous client for the mesh, used by the CLI, the demo and benchmarks."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from llmesh.pb.common.v1 import types_pb2
from llmesh.pb.inference.v1 import inference_pb2 as pb
from llmesh.pb.inference.v1 import inference_pb2_grpc as pb_grpc
from llmesh.runtime.channels import channel_options
from llmesh.runtime.identity import IDENTITY_KEY, InternalIdentity, Principal, load_secret

# Who a local operator is when calling a service directly on this host.
OPERATOR = Principal("local-operator", "system", frozenset({"*"}), frozenset({"admin"}))


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


def sampling(
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: list[str] | None = None,
) -> types_pb2.SamplingParams:
    s = types_pb2.SamplingParams(stop=stop or [])
    for name, value in (
        ("max_tokens", max_tokens),
        ("temperature", temperature),
        ("top_p", top_p),
        ("top_k", top_k),
        ("seed", seed),
    ):
        if value is not None:
            setattr(s, name, value)
    return s


class _Details(grpc.ClientCallDetails):
    def __init__(self, base: Any, metadata: list[tuple[str, str]]) -> None:
        self.method, self.timeout, self.credentials = base.method, base.timeout, base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)
        self.metadata = metadata


class MetadataInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds per-call metadata to every RPC shape. Subclasses implement ``extra`` from the
    method and the serialized first request (``needs_body``: a client stream's first
    message is read before the call starts)."""

    needs_body = False

    def extra(self, method: str, body: bytes) -> list[tuple[str, str]]:
        raise NotImplementedError

    def _details(self, details: Any, body: bytes) -> _Details:
        return _Details(details, [*(details.metadata or ()), *self.extra(details.method, body)])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        body = request.SerializeToString() if self.needs_body else b""
        return continuation(self._details(details, body), request)

    intercept_unary_stream = intercept_unary_unary

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        if not self.needs_body:
            return continuation(self._details(details, b""), request_iterator)
        it = iter(request_iterator)
        first = next(it, None)
        body = b"" if first is None else first.SerializeToString()
        rest = it if first is None else itertools.chain([first], it)
        return continuation(self._details(details, body), rest)

    intercept_stream_stream = intercept_stream_unary


class _WithIdentity(MetadataInterceptor):
    """Attaches a fresh internal identity to every call (tokens live 60 s)."""

    def __init__(self, identity: InternalIdentity, principal: Principal) -> None:
        self.identity, self.principal = identity, principal

    def extra(self, method: str, body: bytes) -> list[tuple[str, str]]:
        return [(IDENTITY_KEY, self.identity.mint(self.principal))]


def local_channel(address: str, home: Path, principal: Principal = OPERATOR, *, retries: bool = True) -> grpc.Channel:
    """A channel straight to a service on this host, vouched for with the mesh's
    internal secret (``LLMESH_HOME/security/internal.key``): for operators' tools on
    the same machine. Everyone else goes through the gateway."""
    channel = grpc.insecure_channel(address, options=channel_options(retries=retries))
    return grpc.intercept_channel(channel, _WithIdentity(InternalIdentity(load_secret(home)), principal))


class InferenceClient:
    def __init__(self, address: str, home: Path, timeout: float = 120.0) -> None:
        self.channel = local_channel(address, home)
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
