"""The one server interceptor chain: request id → logging + metrics → exceptions to status.

Tracing comes first (OpenTelemetry's own aio interceptor, added in ``server.py``)
so that logs carry the trace id. Servicers never call ``context.abort``; they raise
:mod:`llmesh.runtime.errors` and this module maps them once.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from prometheus_client import Counter, Histogram

from llmesh.runtime import errors
from llmesh.runtime.logs import request_id_var

log = logging.getLogger("llmesh.rpc")

REQUEST_ID_KEY = "x-request-id"

HANDLED = Counter("grpc_server_handled_total", "RPCs completed", ["grpc_method", "grpc_code"])
LATENCY = Histogram(
    "grpc_server_handling_seconds",
    "RPC duration (streams: until the last message)",
    ["grpc_method"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


def _pack(msg: Any) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def status_for(exc: BaseException, request_id: str) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...]]:
    """The status code, message and trailing metadata (rich details) for an exception."""
    if isinstance(exc, errors.LlmeshError):
        code, message = exc.code, exc.message
        details = [_pack(error_details_pb2.ErrorInfo(reason=exc.reason, domain=errors.DOMAIN, metadata=exc.metadata))]
        if isinstance(exc, errors.InvalidArgument):
            violation = error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=exc.description)
            details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
        if isinstance(exc, errors.RetryableError):
            delay = duration_pb2.Duration()
            delay.FromTimedelta(datetime.timedelta(seconds=exc.retry_after_s))
            details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    elif isinstance(exc, NotImplementedError):
        # What generated base servicers raise for an RPC that is only drafted.
        code, message = grpc.StatusCode.UNIMPLEMENTED, "method not implemented yet"
        details = [_pack(error_details_pb2.ErrorInfo(reason="UNIMPLEMENTED", domain=errors.DOMAIN))]
    else:
        code, message = grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})"
        details = [_pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=errors.DOMAIN))]
    details.append(_pack(error_details_pb2.RequestInfo(request_id=request_id)))
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    return code, message, (("grpc-status-details-bin", status.SerializeToString()), (REQUEST_ID_KEY, request_id))


class _Call:
    """Per-RPC bookkeeping shared by the four handler shapes."""

    def __init__(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.method = method
        self.context = context
        md = dict(context.invocation_metadata() or ())
        self.request_id = str(md.get(REQUEST_ID_KEY) or uuid.uuid4().hex)
        self.token = request_id_var.set(self.request_id)
        self.start = time.perf_counter()

    async def fail(self, exc: BaseException) -> None:
        code, message, trailers = status_for(exc, self.request_id)
        level = logging.ERROR if code == grpc.StatusCode.INTERNAL else logging.INFO
        log.log(
            level,
            "rpc failed",
            exc_info=exc if level == logging.ERROR else None,
            extra={"fields": {"method": self.method, "code": code.name, "error": message}},
        )
        self._done(code.name)
        await self.context.abort(code, message, trailing_metadata=trailers)

    def ok(self) -> None:
        self._done("OK")

    def cancelled(self) -> None:
        self._done("CANCELLED")

    def _done(self, code: str) -> None:
        elapsed = time.perf_counter() - self.start
        HANDLED.labels(self.method, code).inc()
        LATENCY.labels(self.method).observe(elapsed)
        if code == "OK":
            log.info("rpc ok", extra={"fields": {"method": self.method, "code": code, "ms": round(elapsed * 1000, 2)}})
        request_id_var.reset(self.token)


def _is_abort(exc: BaseException) -> bool:
    # A handler (or a lower interceptor) already chose the status.
    return isinstance(exc, (asyncio.CancelledError, grpc.aio.AbortError))


def _wrap_unary(method: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def handler(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        call = _Call(method, context)
        try:
            response = await fn(request_or_iterator, context)
        except BaseException as exc:
            if _is_abort(exc):
                call.cancelled()
                raise
            await call.fail(exc)
            return None
        # A unary response carries the request id in its trailers: sending initial
        # metadata early would cost a separate write per call.
        trailers = tuple(context.trailing_metadata() or ())
        if not any(k == REQUEST_ID_KEY for k, _ in trailers):
            context.set_trailing_metadata((*trailers, (REQUEST_ID_KEY, call.request_id)))
        call.ok()
        return response

    return handler


def _wrap_stream(method: str, fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def handler(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        call = _Call(method, context)
        await context.send_initial_metadata(((REQUEST_ID_KEY, call.request_id),))
        try:
            async for item in fn(request_or_iterator, context):
                yield item
        except BaseException as exc:
            if _is_abort(exc) or isinstance(exc, GeneratorExit):
                call.cancelled()
                raise
            await call.fail(exc)
            return
        call.ok()

    return handler


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Request id, logging, metrics and exception → status for every RPC shape."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if method.startswith(("/grpc.health.", "/grpc.reflection.")):
            return handler
        kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_wrap_unary(method, handler.unary_unary), **kw)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(_wrap_unary(method, handler.stream_unary), **kw)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_wrap_stream(method, handler.unary_stream), **kw)
        return grpc.stream_stream_rpc_method_handler(_wrap_stream(method, handler.stream_stream), **kw)
