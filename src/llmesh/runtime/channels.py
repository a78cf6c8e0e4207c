"""Channels to peers: created once at start-up, passed into constructors, with a
retry policy in the service config, keepalive, trace propagation, and helpers
to carry the caller's deadline to the next hop."""

from __future__ import annotations

import json
from typing import Any

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

# Retry only what is safe to retry: the call never reached the peer's handler.
RETRY_SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [{}],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}


def channel_options(max_message_bytes: int = 16 * 1024 * 1024, *, retries: bool = True) -> list[tuple[str, object]]:
    """``retries``: gRPC retries UNAVAILABLE calls by itself, resending the same
    metadata — off for signed calls, whose nonce may be used once."""
    options: list[tuple[str, object]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if retries:
        options += [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(RETRY_SERVICE_CONFIG))]
    else:
        options.append(("grpc.enable_retries", 0))
    return options


def peer_channel(target: str, *, max_message_bytes: int = 16 * 1024 * 1024, traced: bool = True) -> grpc.aio.Channel:
    """An aio channel to a peer service. Create it inside the running event loop.
    ``traced``: a client span per call (OpenTelemetry); without it the caller
    propagates the trace context itself (the gateway's proxy does)."""
    return grpc.aio.insecure_channel(
        target,
        options=channel_options(max_message_bytes),
        interceptors=aio_client_interceptors() if traced else None,  # type: ignore[no-untyped-call]  # otel: untyped
    )


def remaining_timeout(context: grpc.aio.ServicerContext[Any, Any], default: float) -> float:
    """Seconds left of the caller's deadline (or ``default`` when it set none),
    to pass as the timeout of the next hop so deadlines propagate."""
    left = context.time_remaining()
    return default if left is None else max(0.0, min(left, default))
