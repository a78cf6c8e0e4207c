"""Per-call metadata for every RPC shape, on sync (``MetadataInterceptor``) and aio
(``AioMetadata``) channels. Subclasses say what to add from the method and the serialized
first request; ``needs_body``: a client stream's first message is read before the call
starts (signatures cover it)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any

import grpc
import grpc.aio

Metadata = list[tuple[str, str]]


class _Details(grpc.ClientCallDetails):
    def __init__(self, base: Any, metadata: Metadata) -> None:
        self.method, self.timeout, self.credentials = base.method, base.timeout, base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)
        self.metadata = tuple(metadata)


def _serialize(message: Any) -> bytes:
    return b"" if message is None else bytes(message.SerializeToString())


class MetadataInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """For ``grpc.intercept_channel``: subclasses implement ``extra``."""

    needs_body = False

    def extra(self, method: str, body: bytes) -> Metadata:
        raise NotImplementedError

    def _details(self, details: Any, body: bytes) -> _Details:
        return _Details(details, [*(details.metadata or ()), *self.extra(details.method, body)])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        body = _serialize(request) if self.needs_body else b""
        return continuation(self._details(details, body), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return self.intercept_unary_unary(continuation, details, request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        if not self.needs_body:
            return continuation(self._details(details, b""), request_iterator)
        it = iter(request_iterator)
        first = next(it, None)
        rest = it if first is None else itertools.chain([first], it)
        return continuation(self._details(details, _serialize(first)), rest)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return self.intercept_stream_unary(continuation, details, request_iterator)


async def _prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield first
    async for message in rest:
        yield message


class AioMetadata:
    """Per-call metadata for aio channels: subclasses implement the coroutine ``extra`` (it
    may fetch a token); pass ``interceptors()`` to ``grpc.aio.insecure_channel``. (An aio
    channel files each interceptor under the first RPC shape it implements, so one object
    per shape.) Client streams need a request iterator (sync or async) when
    ``needs_body``: a call fed with ``write()`` has no first message to sign before it starts."""

    needs_body = False

    async def extra(self, method: str, body: bytes) -> Metadata:
        raise NotImplementedError

    def interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        return [_AioUnaryUnary(self), _AioUnaryStream(self), _AioStreamUnary(self), _AioStreamStream(self)]

    async def details(self, details: grpc.aio.ClientCallDetails, body: bytes) -> grpc.aio.ClientCallDetails:
        raw: str | bytes = details.method  # bytes at run time, whatever the stubs say
        method = raw.decode() if isinstance(raw, bytes) else raw
        pairs = [*(tuple(details.metadata) if details.metadata else ()), *await self.extra(method, body)]
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, grpc.aio.Metadata(*pairs), details.credentials, details.wait_for_ready
        )

    async def unary(self, continuation: Any, details: Any, request: Any) -> Any:
        body = _serialize(request) if self.needs_body else b""
        return await continuation(await self.details(details, body), request)

    async def streaming(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        if not self.needs_body:
            return await continuation(await self.details(details, b""), request_iterator)
        if request_iterator is None:
            raise ValueError("a signed client stream needs a request iterator (its first message is signed)")
        first: Any
        rest: AsyncIterable[Any] | Iterable[Any]
        if isinstance(request_iterator, AsyncIterable):
            ait = aiter(request_iterator)
            first = await anext(ait, None)
            rest = ait if first is None else _prepend(first, ait)
        else:
            it = iter(request_iterator)
            first = next(it, None)
            rest = it if first is None else itertools.chain([first], it)
        return await continuation(await self.details(details, _serialize(first)), rest)


class _AioUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, source: AioMetadata) -> None:
        self.source = source

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await self.source.unary(continuation, client_call_details, request)


class _AioUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, source: AioMetadata) -> None:
        self.source = source

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await self.source.unary(continuation, client_call_details, request)


class _AioStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, source: AioMetadata) -> None:
        self.source = source

    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await self.source.streaming(continuation, client_call_details, request_iterator)


class _AioStreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, source: AioMetadata) -> None:
        self.source = source

    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await self.source.streaming(continuation, client_call_details, request_iterator)
