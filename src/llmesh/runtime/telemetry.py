"""OpenTelemetry tracing (OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set) and the
Prometheus /metrics endpoint, one per service."""

from __future__ import annotations

import logging
import os

import prometheus_client
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

log = logging.getLogger(__name__)


def setup_tracing(service: str) -> TracerProvider:
    """Install a tracer provider. Without an endpoint spans are still created (so
    logs carry trace ids and context propagates to peers) but not exported."""
    provider = TracerProvider(resource=Resource.create({"service.name": f"llmesh-{service}"}))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        log.info(
            "exporting traces over OTLP", extra={"fields": {"endpoint": os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"]}}
        )
    trace.set_tracer_provider(provider)
    return provider


def start_metrics(host: str, port: int) -> None:
    """Serve Prometheus metrics on http://host:port/metrics (port 0: disabled)."""
    if port:
        prometheus_client.start_http_server(port, addr=host)
