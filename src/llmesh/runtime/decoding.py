"""Request bytes that do not parse are the caller's error, not the server's.

gRPC deserializes a request before any interceptor's behaviour runs, and a failing
deserializer surfaces as UNKNOWN with the exception's class in the message (a stream's
as whatever the servicer does with the exception: INTERNAL, or a call left hanging).
:func:`tolerant` wraps a handler's request deserializer so that it never raises: bytes
that do not parse become a :class:`Malformed` marker, which the interceptor chain
(``interceptors.py``) answers with INVALID_ARGUMENT before, or instead of, the servicer
seeing it. The gateway, which forwards raw bytes, checks them with :func:`parse`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from llmesh.runtime.errors import LlmeshError

Deserializer = Callable[[bytes], Any]
M = TypeVar("M", bound=Message)


class MalformedRequest(LlmeshError):
    """A request message that is not valid protobuf for its type."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "MALFORMED_REQUEST"

    def __init__(self, type_name: str) -> None:
        super().__init__(f"request body is not a valid {type_name}", metadata={"type": type_name})
        self.type_name = type_name


class Malformed:
    """What a tolerant deserializer returns for bytes that do not parse."""

    __slots__ = ("type_name",)

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def error(self) -> MalformedRequest:
        return MalformedRequest(self.type_name)


def parse(cls: type[M], raw: bytes) -> M:
    """``cls`` parsed from ``raw``; :class:`MalformedRequest` if the bytes are not one
    (truncated, bad tags or varints, unterminated groups, invalid UTF-8 in a string,
    nesting too deep)."""
    try:
        return cls.FromString(raw)
    except Exception:  # DecodeError and whatever else a parser throws on hostile bytes
        raise MalformedRequest(cls.DESCRIPTOR.full_name) from None


def type_name(deserializer: Deserializer) -> str:
    """The message type a generated deserializer (``Request.FromString``) parses."""
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "request message"))


def tolerant(deserializer: Deserializer | None) -> Deserializer | None:
    """``deserializer`` that returns :class:`Malformed` instead of raising (None, the
    raw-bytes handler of a proxy, stays None)."""
    if deserializer is None:
        return None
    name = type_name(deserializer)

    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception:
            return Malformed(name)

    return decode
