"""asyncio gRPC server bootstrap shared by every service.

Health checking (NOT_SERVING until ``warmup`` succeeds, then SERVING), server
reflection with names taken from the descriptors, keepalive and message-size
limits, the interceptor chain, and graceful shutdown on SIGTERM/SIGINT:
health flips to NOT_SERVING, new calls are refused, in-flight calls get
``grace_seconds`` to finish.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from llmesh.runtime import files
from llmesh.runtime.config import ServerSettings
from llmesh.runtime.identity import IdentityInterceptor, InternalIdentity
from llmesh.runtime.interceptors import ErrorMappingInterceptor
from llmesh.runtime.logs import setup_logging
from llmesh.runtime.telemetry import setup_tracing, start_metrics

log = logging.getLogger("llmesh.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Service:
    """What a service plugs into the bootstrap."""

    name: str
    settings: ServerSettings
    # Registers servicers on the server; returns the descriptors of what it added.
    register: Callable[[grpc.aio.Server], Sequence[ServiceDescriptor]]
    # Loads/warms what the service needs; retried with backoff until it succeeds.
    warmup: Callable[[], Awaitable[None]] | None = None
    # Releases resources (channels, pools) after the server stopped.
    close: Callable[[], Awaitable[None]] | None = None
    # When set, every RPC but health and reflection needs the gateway's internal identity.
    identity: InternalIdentity | None = None
    options: list[tuple[str, object]] = field(default_factory=list)


class _TraceInterceptor(grpc.aio.ServerInterceptor):
    """OpenTelemetry's aio interceptor, minus the health service: its Watch writes
    with ``context.write`` (not a generator), which that interceptor cannot wrap."""

    def __init__(self) -> None:
        self._inner = aio_server_interceptor()  # type: ignore[no-untyped-call]  # opentelemetry-instrumentation-grpc ships no types

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        if handler_call_details.method.startswith("/grpc.health."):
            return await continuation(handler_call_details)
        return await self._inner.intercept_service(continuation, handler_call_details)


def server_options(s: ServerSettings) -> list[tuple[str, object]]:
    return [
        ("grpc.max_send_message_length", s.max_message_bytes),
        ("grpc.max_receive_message_length", s.max_message_bytes),
        ("grpc.keepalive_time_ms", s.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", s.keepalive_timeout_ms),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.max_concurrent_streams", s.max_concurrent_streams),
        ("grpc.so_reuseport", 0),
    ]


async def _warm(svc: Service, health_servicer: health.aio.HealthServicer, names: Sequence[str]) -> None:
    delay = 0.2
    while svc.warmup is not None:
        try:
            await svc.warmup()
            break
        except Exception as exc:  # keep NOT_SERVING and retry: peers may still be starting
            log.info("warm-up not done yet", extra={"fields": {"error": str(exc), "retry_s": delay}})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
    for n in ("", *names):
        await health_servicer.set(n, SERVING)
    log.info("serving", extra={"fields": {"services": list(names)}})


async def run(svc: Service) -> None:
    """Start the server, serve until SIGTERM/SIGINT, then shut down gracefully."""
    s = svc.settings
    tracer_provider = setup_tracing(svc.name)
    start_metrics(s.host, s.metrics_port)
    server = grpc.aio.server(
        interceptors=[
            _TraceInterceptor(),
            *([IdentityInterceptor(svc.identity)] if svc.identity else []),
            ErrorMappingInterceptor(),
        ],
        options=server_options(s) + svc.options,
    )
    descriptors = svc.register(server)
    names = [d.full_name for d in descriptors]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for n in ("", *names):
        await health_servicer.set(n, NOT_SERVING)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    address = files.address(s.host, s.port)
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"cannot bind {address}")
    await server.start()
    log.info("listening", extra={"fields": {"address": address, "metrics_port": s.metrics_port}})

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    warm = asyncio.create_task(_warm(svc, health_servicer, names))
    await stop.wait()

    log.info("shutting down", extra={"fields": {"grace_s": s.grace_seconds}})
    warm.cancel()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(s.grace_seconds)
    if svc.close is not None:
        await svc.close()
    tracer_provider.shutdown()  # flushes spans still queued for export
    log.info("stopped")


def main(svc_factory: Callable[[], Service], name: str) -> None:
    """Entry point for ``python -m llmesh.services.<name>``."""
    setup_logging(name)
    asyncio.run(_main(svc_factory))


async def _main(svc_factory: Callable[[], Service]) -> None:
    # Built inside the loop: aio channels must be created in the running loop.
    await run(svc_factory())
