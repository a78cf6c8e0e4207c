"""A schema-aware gRPC proxy: one generic handler forwards every routed RPC, in all
four shapes, as raw bytes. Deadlines, cancellation and metadata pass through; the
upstream's status (with its rich details) comes back unchanged. Policy hooks see the
route and may decode only what they need.

Every request message is parsed against the method's input type before it is
forwarded (the original bytes go on: they are what the caller signed): one that does
not parse ends the call with INVALID_ARGUMENT, audited, and cancels the upstream call
of a stream that had already started."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
from opentelemetry.propagate import inject

from llmesh.runtime.channels import peer_channel
from llmesh.runtime.decoding import MalformedRequest, parse
from llmesh.services.gateway.routes import Route

# Metadata that belongs to this hop only (HTTP/2 and gRPC transport headers).
HOP_BY_HOP = frozenset(
    {
        "grpc-timeout",
        "grpc-encoding",
        "grpc-accept-encoding",
        "content-type",
        "te",
        "user-agent",
        "authorization",
        "traceparent",
        "tracestate",
    }
)
Metadata = Sequence[tuple[str, str | bytes]]
Context = grpc.aio.ServicerContext[Any, Any]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # not subscriptable at run time
# The upstream calls, by what the proxy does with them.
UnaryResponse = grpc.aio.UnaryUnaryCall[bytes, bytes] | grpc.aio.StreamUnaryCall[bytes, bytes]
StreamResponse = grpc.aio.UnaryStreamCall[bytes, bytes] | grpc.aio.StreamStreamCall[bytes, bytes]
StreamRequest = grpc.aio.StreamUnaryCall[bytes, bytes] | grpc.aio.StreamStreamCall[bytes, bytes]
Transform = Callable[[bytes], bytes]


def _same(b: bytes) -> bytes:
    return b


async def _nothing(code: grpc.StatusCode, last_response: bytes | None) -> None:
    return None


@dataclass
class Forward:
    """What the policy decided for one admitted call."""

    metadata: Metadata
    request: Transform = _same  # applied to every request message (masking)
    response: Transform = _same  # applied to every response message (unmasking)
    # Called once when the call ends, with its status and last response (audit, token usage).
    done: Callable[[grpc.StatusCode, bytes | None], Awaitable[None]] = _nothing
    # After a response stream ended OK: one more message to send (text held back by
    # ``response`` at the end of the stream), or None.
    tail: Callable[[], bytes | None] = lambda: None
    # A check still running when the upstream call starts (read-class rate limit): no
    # response is released before it passed; if it fails, the upstream call is cancelled.
    gate: Awaitable[None] | None = None


# Called before forwarding with the first request message (None for an empty client
# stream); raises domain errors to refuse the call.
Admit = Callable[[Route, Context, bytes | None], Awaitable[Forward]]


def forwardable(metadata: Metadata | None) -> list[tuple[str, str | bytes]]:
    return [(k, v) for k, v in (metadata or ()) if k not in HOP_BY_HOP and not k.startswith(":")]


class Upstreams:
    """One channel per upstream address, created once."""

    def __init__(self, addresses: Sequence[str], max_message_bytes: int) -> None:
        # No client span per forwarded call: the gateway's server span is the parent of
        # the upstream's span (``_traced``), which keeps the trace whole for less.
        self._channels = {
            a: peer_channel(a, max_message_bytes=max_message_bytes, traced=False) for a in dict.fromkeys(addresses)
        }

    def channel(self, address: str) -> grpc.aio.Channel:
        return self._channels[address]

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()


async def _relay_error(context: Context, err: grpc.aio.AioRpcError) -> None:
    """The upstream's status, message and trailers (rich details included), unchanged."""
    trailers = tuple(forwardable(list(err.trailing_metadata() or ())))
    await context.abort(err.code(), err.details() or "", trailing_metadata=trailers)


class ProxyHandler(grpc.GenericRpcHandler):
    def __init__(
        self, routes: Mapping[str, Route], upstreams: Upstreams, admit: Admit, default_timeout_s: float
    ) -> None:
        self.routes = routes
        self.upstreams = upstreams
        self.admit = admit
        self.default_timeout_s = default_timeout_s

    def _timeout(self, context: Context) -> float:
        left = context.time_remaining()
        return self.default_timeout_s if left is None else max(0.0, left)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        route = self.routes.get(handler_call_details.method)
        if route is None:
            return None  # UNIMPLEMENTED, as for any unknown method
        ch = self.upstreams.channel(route.upstream)
        if not route.client_streaming and not route.server_streaming:
            return grpc.unary_unary_rpc_method_handler(self._unary_unary(route, ch))
        if not route.client_streaming:
            return grpc.unary_stream_rpc_method_handler(self._unary_stream(route, ch))
        if not route.server_streaming:
            return grpc.stream_unary_rpc_method_handler(self._stream_unary(route, ch))
        return grpc.stream_stream_rpc_method_handler(self._stream_stream(route, ch))

    def _unary_unary(self, route: Route, ch: grpc.aio.Channel) -> Callable[[bytes, Context], Awaitable[bytes | None]]:
        rpc: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary(route.path)

        async def handle(request: bytes, context: Context) -> bytes | None:
            fwd = await self.admit(route, context, request)
            await _validated(route, fwd, request)
            call = rpc(fwd.request(request), timeout=self._timeout(context), metadata=_traced(fwd.metadata))
            await _pass(fwd, call)
            return await _answer(call, fwd, context)

        return handle

    def _unary_stream(self, route: Route, ch: grpc.aio.Channel) -> Callable[[bytes, Context], AsyncIterator[bytes]]:
        rpc: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = ch.unary_stream(route.path)

        async def handle(request: bytes, context: Context) -> AsyncIterator[bytes]:
            fwd = await self.admit(route, context, request)
            await _validated(route, fwd, request)
            call = rpc(fwd.request(request), timeout=self._timeout(context), metadata=_traced(fwd.metadata))
            await _pass(fwd, call)
            async for msg in self._relay(call, fwd, context):
                yield msg

        return handle

    def _stream_unary(
        self, route: Route, ch: grpc.aio.Channel
    ) -> Callable[[AsyncIterator[bytes], Context], Awaitable[bytes | None]]:
        rpc: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = ch.stream_unary(route.path)

        async def handle(requests: AsyncIterator[bytes], context: Context) -> bytes | None:
            first, rest = await _peek(requests)
            fwd = await self.admit(route, context, first)
            await _validated(route, fwd, first)
            call = rpc(timeout=self._timeout(context), metadata=_traced(fwd.metadata))
            async with _pumping(call, route, first, rest, fwd.request) as copy:
                await _pass(fwd, call)
                return await _answer(call, fwd, context, copy)

        return handle

    def _stream_stream(
        self, route: Route, ch: grpc.aio.Channel
    ) -> Callable[[AsyncIterator[bytes], Context], AsyncIterator[bytes]]:
        rpc: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = ch.stream_stream(route.path)

        async def handle(requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[bytes]:
            first, rest = await _peek(requests)
            fwd = await self.admit(route, context, first)
            await _validated(route, fwd, first)
            call = rpc(timeout=self._timeout(context), metadata=_traced(fwd.metadata))
            async with _pumping(call, route, first, rest, fwd.request) as copy:
                await _pass(fwd, call)
                async for msg in self._relay(call, fwd, context, copy):
                    yield msg

        return handle

    async def _relay(
        self, call: StreamResponse, fwd: Forward, context: Context, copy: _Copy | None = None
    ) -> AsyncIterator[bytes]:
        last, code = None, grpc.StatusCode.CANCELLED
        try:
            async for msg in call:
                last = msg
                yield fwd.response(msg)
            code = grpc.StatusCode.OK
            extra = fwd.tail()
            if extra is not None:
                yield extra
        except grpc.aio.AioRpcError as err:
            code = err.code()
            await _relay_error(context, err)
        except asyncio.CancelledError:
            failure = _copy_failure(copy)
            if failure is None:
                raise
            code = _failure_code(failure)
            raise failure from None
        finally:
            call.cancel()  # the client went away (or we are done): stop the upstream too
            await fwd.done(code, last)


def _traced(metadata: Metadata) -> list[tuple[str, str | bytes]]:
    """The call's metadata plus the current trace context (W3C ``traceparent``)."""
    carrier: dict[str, str] = {}
    inject(carrier)
    return [*metadata, *carrier.items()]


async def _pass(fwd: Forward, call: grpc.aio.Call) -> None:
    if fwd.gate is None:
        return
    try:
        await fwd.gate
    except BaseException:
        call.cancel()
        raise


async def _validated(route: Route, fwd: Forward, raw: bytes | None) -> None:
    """Refuses (INVALID_ARGUMENT, audited) a request message that is not a valid
    ``route.request``, before it is forwarded; a check still pending on the call (the
    read-class rate limit) answers first if it fails."""
    if raw is None:
        return
    try:
        parse(route.request, raw)
    except MalformedRequest:
        if fwd.gate is not None:
            await fwd.gate
        await fwd.done(grpc.StatusCode.INVALID_ARGUMENT, None)
        raise


async def _answer(call: UnaryResponse, fwd: Forward, context: Context, copy: _Copy | None = None) -> bytes | None:
    """The single response of a unary-response call, or the upstream's status."""
    try:
        response = await call
    except grpc.aio.AioRpcError as err:
        await fwd.done(err.code(), None)
        await _relay_error(context, err)
        return None
    except asyncio.CancelledError:
        failure = _copy_failure(copy)
        if failure is None:
            raise
        await fwd.done(_failure_code(failure), None)
        raise failure from None
    await fwd.done(grpc.StatusCode.OK, response)
    context.set_trailing_metadata(tuple(forwardable(list(await call.trailing_metadata()))))
    return fwd.response(response)


async def _peek(requests: AsyncIterator[bytes]) -> tuple[bytes | None, AsyncIterator[bytes]]:
    """The first message of a client stream (signatures cover it) and the stream."""
    it = requests.__aiter__()
    try:
        return await it.__anext__(), it
    except StopAsyncIteration:
        return None, it


@dataclass
class _Copy:
    """The copy of a client stream: why it stopped the call, if it did."""

    failure: BaseException | None = None


def _copy_failure(copy: _Copy | None) -> BaseException | None:
    """What ended a call the copy cancelled; None when the cancellation is the
    handler's own (the client went away)."""
    task = asyncio.current_task()
    if copy is None or copy.failure is None or (task is not None and task.cancelling()):
        return None
    return copy.failure


def _failure_code(failure: BaseException) -> grpc.StatusCode:
    return grpc.StatusCode.INVALID_ARGUMENT if isinstance(failure, MalformedRequest) else grpc.StatusCode.INTERNAL


@contextlib.asynccontextmanager
async def _pumping(
    call: StreamRequest, route: Route, first: bytes | None, rest: AsyncIterator[bytes], fn: Transform
) -> AsyncIterator[_Copy]:
    """Copies the client's stream to the upstream call (``fn`` applied) while the body
    runs. An upstream that ends the call early (e.g. an upload over its size limit)
    stops the copy; the call's own status is what the client gets, and no read of the
    client's stream outlives the call. A message that is not a valid request (or any
    failure of the copy) cancels the upstream call and is recorded in the yielded
    ``_Copy``: the body's wait on the call then raises it instead of hanging."""
    copy = _Copy()

    async def pump() -> None:
        try:
            if first is not None:
                await call.write(fn(first))
                async for msg in rest:
                    parse(route.request, msg)
                    await call.write(fn(msg))
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            pass  # the upstream finished first: its status is the answer
        except Exception as exc:  # reported through ``copy``, never lost in this task
            copy.failure = exc
            call.cancel()

    task = asyncio.create_task(pump())
    try:
        yield copy
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
