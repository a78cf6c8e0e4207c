"""What a failed call says: its status, message and rich details, and whether the
peer was there at all."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

# What gRPC reports when nothing listens at the address (sync and aio, every platform).
_UNREACHABLE = ("failed to connect to all addresses", "connection refused", "connections to all backends failing")


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
    # Sync errors are grpc.Call objects, aio ones AioRpcError: both have code(), details()
    # and the trailing metadata that carries the rich status.
    call: Any = err
    code = call.code().name if hasattr(call, "code") else "UNKNOWN"
    message = call.details() if hasattr(call, "details") else str(err)
    field, retry = "", None
    status = rpc_status.from_call(call) if hasattr(call, "trailing_metadata") else None
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


def is_unreachable(err: grpc.RpcError) -> bool:
    """True when the call never reached a server: nothing listens at the address."""
    failure = describe_error(err)
    return failure.code == "UNAVAILABLE" and any(s in failure.message.lower() for s in _UNREACHABLE)
