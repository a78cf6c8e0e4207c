"""The one server interceptor chain: request id → logging + metrics → exceptions to status.

Tracing comes first (OpenTelemetry's own aio interceptor, added in ``server.py``)
so that logs carry the trace id. Servicers never call ``context.abort``; they raise
:mod:`llmesh.runtime.errors` and this module maps them once. Request bytes that do not
parse never reach a servicer: every handler's deserializer is made tolerant
(:mod:`llmesh.runtime.decoding`) and a malformed message, the first of a stream or a
later one, ends the call at once with INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, cast

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from prometheus_client import Counter, Histogram

from llmesh.runtime import errors
from llmesh.runtime.decoding import Malformed, tolerant
from llmesh.runtime.logs import request_id_var

log = logging.getLogger("llmesh.rpc")

REQUEST_ID_KEY = "x-request-id"
Context = grpc.aio.ServicerContext[Any, Any]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # not subscriptable at run time

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

    def __init__(self, method: str, context: Context) -> None:
        self.method = method
        self.context = context
        md = dict(context.invocation_metadata() or ())
        self.request_id = str(md.get(REQUEST_ID_KEY) or uuid.uuid4().hex)
        self.token = request_id_var.set(self.request_id)
        self.start = time.perf_counter()
        self.finished = False
        # The abort that ended the call; raised again by whatever tries to end it later
        # (grpc requires that very exception to reach it).
        self.aborted: grpc.aio.AbortError | None = None

    async def fail(self, exc: BaseException) -> None:
        if self.aborted is not None:
            raise self.aborted
        code, message, trailers = status_for(exc, self.request_id)
        level = logging.ERROR if code == grpc.StatusCode.INTERNAL else logging.INFO
        log.log(
            level,
            "rpc failed",
            exc_info=exc if level == logging.ERROR else None,
            extra={"fields": {"method": self.method, "code": code.name, "error": message}},
        )
        self._done(code.name)
        try:
            await self.context.abort(code, message, trailing_metadata=trailers)
        except grpc.aio.AbortError as abort:
            self.aborted = abort
            raise

    def ok(self) -> None:
        self._done("OK")

    def cancelled(self) -> None:
        self._done("CANCELLED")

    def _done(self, code: str) -> None:
        if self.finished:
            return
        self.finished = True
        elapsed = time.perf_counter() - self.start
        HANDLED.labels(self.method, code).inc()
        LATENCY.labels(self.method).observe(elapsed)
        if code == "OK":
            log.info("rpc ok", extra={"fields": {"method": self.method, "code": code, "ms": round(elapsed * 1000, 2)}})
        # A stream message may be refused in a task of the servicer's (another context).
        with contextlib.suppress(ValueError):
            request_id_var.reset(self.token)


def _is_abort(exc: BaseException) -> bool:
    # A handler (or a lower interceptor) already chose the status.
    return isinstance(exc, (asyncio.CancelledError, grpc.aio.AbortError))


# Ends the call with the status for an exception (raises grpc's AbortError).
Fail = Callable[[BaseException], Awaitable[None]]


async def _checked(requests: AsyncIterator[Any], fail: Fail) -> AsyncIterator[Any]:
    """A client stream whose malformed message ends the call there and then, whatever
    the servicer does with the exception it gets from its ``async for``."""
    async for request in requests:
        if isinstance(request, Malformed):
            await fail(request.error())
        yield request


async def _admitted(request_or_iterator: Any, fail: Fail) -> Any:
    """The request for the servicer: a client stream checked message by message; a
    single malformed request refused before the servicer runs."""
    if isinstance(request_or_iterator, Malformed):
        await fail(request_or_iterator.error())
    if hasattr(request_or_iterator, "__aiter__"):
        return _checked(request_or_iterator, fail)
    return request_or_iterator


def _wrap_unary(method: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def handler(request_or_iterator: Any, context: Context) -> Any:
        call = _Call(method, context)
        try:
            response = await fn(await _admitted(request_or_iterator, call.fail), context)
        except BaseException as exc:
            if _is_abort(exc):
                call.cancelled()
                raise
            await call.fail(exc)
            return None
        if call.aborted is not None:  # the servicer swallowed a refused stream message
            raise call.aborted
        # A unary response carries the request id in its trailers: sending initial
        # metadata early would cost a separate write per call.
        trailers = tuple(context.trailing_metadata() or ())
        if not any(k == REQUEST_ID_KEY for k, _ in trailers):
            context.set_trailing_metadata((*trailers, (REQUEST_ID_KEY, call.request_id)))
        call.ok()
        return response

    return handler


def _wrap_stream(method: str, fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def handler(request_or_iterator: Any, context: Context) -> AsyncIterator[Any]:
        call = _Call(method, context)
        await context.send_initial_metadata(((REQUEST_ID_KEY, call.request_id),))
        try:
            async for item in fn(await _admitted(request_or_iterator, call.fail), context):
                if call.aborted is not None:  # the servicer swallowed a refused stream message
                    raise call.aborted
                yield item
        except BaseException as exc:
            if _is_abort(exc) or isinstance(exc, GeneratorExit):
                call.cancelled()
                raise
            await call.fail(exc)
            return
        if call.aborted is not None:
            raise call.aborted
        call.ok()

    return handler


def _behaviour(handler: Handler) -> Callable[..., Any]:
    """The handler's servicer function, whichever its shape (the stubs type them as
    sync callables; on an aio server they are coroutine or async generator functions)."""
    fn = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    assert fn is not None, "a method handler without a behaviour"
    return cast(Callable[..., Any], fn)


def _guard_only(method: str, handler: Handler) -> Handler:
    """Health and reflection keep their own status handling (health's Watch writes
    with ``context.write``); they only get the malformed-request refusal."""
    fn = _behaviour(handler)

    async def refuse_or_pass(request_or_iterator: Any, context: Context) -> Any:
        async def fail(exc: BaseException) -> None:
            await _Call(method, context).fail(exc)  # request id, log and metrics for a refusal only

        return await _admitted(request_or_iterator, fail)

    if inspect.isasyncgenfunction(fn):

        async def streaming(request_or_iterator: Any, context: Context) -> AsyncIterator[Any]:
            async for item in fn(await refuse_or_pass(request_or_iterator, context), context):
                yield item

        behaviour: Callable[..., Any] = streaming
    else:

        async def single(request_or_iterator: Any, context: Context) -> Any:
            return await fn(await refuse_or_pass(request_or_iterator, context), context)

        behaviour = single
    return _rebuild(handler, behaviour, tolerant(handler.request_deserializer))


def _rebuild(handler: Handler, behaviour: Callable[..., Any], deserializer: Callable[[bytes], Any] | None) -> Handler:
    kw = {"request_deserializer": deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(behaviour, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(behaviour, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(behaviour, **kw)
    return grpc.stream_stream_rpc_method_handler(behaviour, **kw)


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Request id, logging, metrics and exception → status for every RPC shape."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if method.startswith(("/grpc.health.", "/grpc.reflection.")):
            return _guard_only(method, handler)
        deserializer = tolerant(handler.request_deserializer)
        if handler.unary_unary or handler.stream_unary:
            return _rebuild(handler, _wrap_unary(method, _behaviour(handler)), deserializer)
        return _rebuild(handler, _wrap_stream(method, _behaviour(handler)), deserializer)
