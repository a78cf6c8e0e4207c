"""Health, reflection and graceful shutdown, checked with grpc's own clients; the
placeholder services (embedding, retrieval) run like the others."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from llmesh.client import ApiKey, gateway_channel, local_channel, sampling
from llmesh.launcher import control, render_status
from llmesh.pb.common.v1 import types_pb2
from llmesh.pb.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from llmesh.pb.inference.v1 import inference_pb2 as pb
from llmesh.pb.inference.v1 import inference_pb2_grpc
from llmesh.pb.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from tests.support.mesh import Mesh
from tests.support.sandbox import free_ports

SERVICE = "llmesh.inference.v1.Inference"
# Started, routed and announced like every service; each RPC answers UNIMPLEMENTED for now.
PLACEHOLDERS = {"embedding": "llmesh.embedding.v1.Embedding", "retrieval": "llmesh.retrieval.v1.Retrieval"}


def test_health_reports_serving_per_service(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        assert (
            health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            == health_pb2.HealthCheckResponse.SERVING
        )
    with pytest.raises(grpc.RpcError) as e:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


def test_reflection_lists_and_describes_the_api(channel: grpc.Channel) -> None:
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    pool = DescriptorPool(db)
    svc = pool.FindServiceByName(SERVICE)
    methods = {m.name: m for m in svc.methods}
    assert {"Generate", "GenerateStream", "Chat", "ChatStream", "Converse", "ListTemplates"} <= set(methods)
    assert methods["GenerateStream"].server_streaming and not methods["GenerateStream"].client_streaming
    assert methods["Converse"].client_streaming and methods["Converse"].server_streaming
    # The request type resolves with its dependencies (common/v1 types and options).
    assert pool.FindMessageTypeByName("llmesh.common.v1.SamplingParams").fields_by_name["top_p"]


def test_metrics_endpoint_counts_rpcs(mesh: Mesh, stub: inference_pb2_grpc.InferenceStub) -> None:
    import urllib.request

    stub.ListTemplates(pb.ListTemplatesRequest(), timeout=10)
    body = (
        urllib.request.urlopen(f"http://127.0.0.1:{mesh.cfg.inference.server.metrics_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    assert (
        'grpc_server_handled_total{grpc_code="OK",grpc_method="/llmesh.inference.v1.Inference/ListTemplates"}' in body
    )


def start_service(mesh: Mesh, **env_extra: str) -> tuple[subprocess.Popen[bytes], grpc.Channel]:
    """A second inference service process on its own port, sharing the mesh's peers."""
    (port,) = free_ports(1)
    env = {
        **os.environ,
        "LLMESH_CONFIG": str(mesh.config_path),
        "LLMESH__INFERENCE__SERVER__PORT": str(port),
        "LLMESH__INFERENCE__SERVER__METRICS_PORT": "0",
        **env_extra,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmesh.services.inference"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    channel = local_channel(f"127.0.0.1:{port}", mesh.cfg.home)
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 60
    while True:
        try:
            if (
                health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                == health_pb2.HealthCheckResponse.SERVING
            ):
                return proc, channel
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("service never became SERVING")
        time.sleep(0.2)


def test_graceful_shutdown_finishes_in_flight_calls(mesh: Mesh) -> None:
    # A grace far longer than the stream, so a loaded machine cannot turn it into a cut.
    proc, channel = start_service(mesh, LLMESH__INFERENCE__SERVER__GRACE_SECONDS="90")
    try:
        health = health_pb2_grpc.HealthStub(channel)
        stub = inference_pb2_grpc.InferenceStub(channel)
        stream = stub.GenerateStream(
            pb.GenerateRequest(prompt="a long answer", sampling=sampling(max_tokens=200, seed=5)), timeout=120
        )
        next(stream)
        proc.send_signal(signal.SIGTERM)
        rest = list(stream)  # the in-flight stream runs to its end
        assert rest and rest[-1].finish_reason == types_pb2.FINISH_REASON_LENGTH
        # New calls are refused once shutdown started.
        with pytest.raises(grpc.RpcError) as e:
            health.Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert proc.wait(timeout=60) == 0
    finally:
        channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_traces_are_exported_over_otlp_when_an_endpoint_is_set(mesh: Mesh) -> None:
    from concurrent import futures

    collector = _Collector()
    receiver = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, receiver)
    port = receiver.add_insecure_port("127.0.0.1:0")
    receiver.start()
    proc, channel = start_service(
        mesh,
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
        OTEL_EXPORTER_OTLP_INSECURE="true",
        OTEL_BSP_SCHEDULE_DELAY="200",
    )
    try:
        stub = inference_pb2_grpc.InferenceStub(channel)
        stub.Generate(pb.GenerateRequest(prompt="traced", sampling=sampling(max_tokens=2)), timeout=30)
        proc.send_signal(signal.SIGTERM)  # shutdown flushes the exporter
        assert proc.wait(timeout=30) == 0
    finally:
        channel.close()
        if proc.poll() is None:
            proc.kill()
        receiver.stop(None)
    spans = [
        (rs.resource, span)
        for req in collector.requests
        for rs in req.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    ]
    names = {span.name for _, span in spans}
    assert "/llmesh.inference.v1.Inference/Generate" in names
    services = {a.value.string_value for res, _ in spans for a in res.attributes if a.key == "service.name"}
    assert services == {"llmesh-inference"}


def test_message_size_limit_is_enforced(mesh: Mesh, stub: inference_pb2_grpc.InferenceStub) -> None:
    too_big = "x" * (mesh.cfg.inference.server.max_message_bytes + 1024)
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(pb.GenerateRequest(prompt=too_big), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_security_service_runs_in_the_mesh(mesh: Mesh) -> None:
    from llmesh.pb.security.v1 import security_pb2, security_pb2_grpc

    with local_channel(f"127.0.0.1:{mesh.cfg.security.server.port}", mesh.cfg.home) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        assert (
            health.Check(health_pb2.HealthCheckRequest(service="llmesh.security.v1.Security"), timeout=5).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        jwks = security_pb2_grpc.SecurityStub(ch).GetJwks(security_pb2.GetJwksRequest(), timeout=5)
        assert '"keys"' in jwks.jwks_json


def test_services_refuse_calls_that_bypass_the_gateway(mesh: Mesh) -> None:
    from llmesh.pb.security.v1 import security_pb2, security_pb2_grpc
    from llmesh.runtime.identity import IDENTITY_KEY, InternalIdentity, Principal

    forged = InternalIdentity(b"x" * 32).mint(Principal("mallory", "acme", frozenset({"*"})))
    for md in ((), ((IDENTITY_KEY, "garbage"),), ((IDENTITY_KEY, forged),)):
        with grpc.insecure_channel(mesh.address) as ch:
            with pytest.raises(grpc.RpcError) as e:
                inference_pb2_grpc.InferenceStub(ch).ListTemplates(pb.ListTemplatesRequest(), metadata=md, timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as e:
                list(
                    inference_pb2_grpc.InferenceStub(ch).GenerateStream(
                        pb.GenerateRequest(prompt="x"), metadata=md, timeout=5
                    )
                )
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(f"127.0.0.1:{mesh.cfg.security.server.port}") as ch:
            with pytest.raises(grpc.RpcError) as e:
                security_pb2_grpc.SecurityStub(ch).ListApiKeys(
                    security_pb2.ListApiKeysRequest(), metadata=md, timeout=5
                )
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("name", PLACEHOLDERS)
def test_placeholder_services_are_started_healthy_and_reflected(
    mesh: Mesh, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    port = mesh.cfg.embedding.server.port if name == "embedding" else mesh.cfg.retrieval.server.port
    with local_channel(f"127.0.0.1:{port}", mesh.cfg.home) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", PLACEHOLDERS[name]):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert PLACEHOLDERS[name] in set(ProtoReflectionDescriptorDatabase(ch).get_services())
    rows = {r.name: r for r in control.status(mesh.cfg)}
    assert (rows[name].state, rows[name].health, rows[name].port) == ("healthy", "SERVING", port)
    capsys.readouterr()
    render_status(list(rows.values()))  # what `llmesh status` prints
    assert name in capsys.readouterr().out


def test_placeholder_rpcs_answer_unimplemented_through_the_gateway(mesh: Mesh) -> None:
    from llmesh.pb.security.v1 import security_pb2

    created = mesh.security().CreateApiKey(
        security_pb2.CreateApiKeyRequest(owner="placeholders", tenant="acme", scopes=["embedding:*", "retrieval:*"]),
        timeout=10,
    )
    gateway = f"127.0.0.1:{mesh.cfg.gateway.server.port}"
    with gateway_channel(gateway, ApiKey(created.key.key_id, created.secret)) as ch:
        assert set(PLACEHOLDERS.values()) <= set(ProtoReflectionDescriptorDatabase(ch).get_services())
        embedding = embedding_pb2_grpc.EmbeddingStub(ch)
        retrieval = retrieval_pb2_grpc.RetrievalStub(ch)
        header = retrieval_pb2.IngestRequest(header=retrieval_pb2.DocumentHeader(collection="docs", document_id="d1"))
        calls = {  # one per shape: unary, server stream, client stream
            "EmbedText": lambda: embedding.EmbedText(embedding_pb2.EmbedTextRequest(texts=["hi"]), timeout=10),
            "ListEmbeddingModels": lambda: embedding.ListEmbeddingModels(
                embedding_pb2.ListEmbeddingModelsRequest(), timeout=10
            ),
            "Search": lambda: retrieval.Search(retrieval_pb2.SearchRequest(collection="docs", query="q"), timeout=10),
            "AnswerStream": lambda: list(
                retrieval.AnswerStream(retrieval_pb2.AnswerRequest(collection="docs", question="q"), timeout=10)
            ),
            "Ingest": lambda: retrieval.Ingest(iter([header, retrieval_pb2.IngestRequest(data=b"text")]), timeout=10),
        }
        for method, call in calls.items():
            with pytest.raises(grpc.RpcError) as e:
                call()
            # Answered by the service itself (not UNAVAILABLE: the route points at something).
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED, (method, e.value.details())
            assert f"/{method} is not implemented yet" in (e.value.details() or "")
