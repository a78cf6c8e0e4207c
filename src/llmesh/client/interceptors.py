"""Per-call metadata for every RPC shape, on sync and aio channels alike. Subclasses say
what to add from the method and the serialized first request; ``needs_body``: a client
stream's first message is read before the call starts (signatures cover it)."""

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


class AioMetadataInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """For ``grpc.aio.insecure_channel(..., interceptors=[...])``: subclasses implement the
    coroutine ``extra`` (it may fetch a token). Client streams need a request iterator
    (sync or async) when ``needs_body``: a call fed with ``write()`` has no first message
    to sign before it starts."""

    needs_body = False

    async def extra(self, method: str, body: bytes) -> Metadata:
        raise NotImplementedError

    async def _details(self, details: grpc.aio.ClientCallDetails, body: bytes) -> grpc.aio.ClientCallDetails:
        raw: str | bytes = details.method  # bytes at run time, whatever the stubs say
        method = raw.decode() if isinstance(raw, bytes) else raw
        pairs = [*(tuple(details.metadata) if details.metadata else ()), *await self.extra(method, body)]
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, grpc.aio.Metadata(*pairs), details.credentials, details.wait_for_ready
        )

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        body = _serialize(request) if self.needs_body else b""
        return await continuation(await self._details(client_call_details, body), request)

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await self.intercept_unary_unary(continuation, client_call_details, request)

    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        if not self.needs_body:
            return await continuation(await self._details(client_call_details, b""), request_iterator)
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
        return await continuation(await self._details(client_call_details, _serialize(first)), rest)

    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await self.intercept_stream_unary(continuation, client_call_details, request_iterator)
