"""The contracts: generated code imports, policy options are complete and readable,
drafted RPCs answer UNIMPLEMENTED, and the Java options generate Java sources."""

from __future__ import annotations

import importlib
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from llmesh.pb.common.v1 import options_pb2

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {
    "inference": "Inference",
    "embedding": "Embedding",
    "retrieval": "Retrieval",
    "trainer": "Trainer",
    "security": "Security",
}


def _service(pkg: str, name: str):
    mod = importlib.import_module(f"llmesh.pb.{pkg}.v1.{pkg}_pb2")
    return mod.DESCRIPTOR.services_by_name[name]


@pytest.mark.parametrize(("pkg", "name"), SERVICES.items())
def test_every_method_declares_its_policy(pkg: str, name: str) -> None:
    for m in _service(pkg, name).methods:
        policy = m.GetOptions().Extensions[options_pb2.method_policy]
        assert policy.scope or policy.anonymous, f"{m.full_name} has no scope"
        assert policy.rate_limit_class != options_pb2.RATE_LIMIT_CLASS_UNSPECIFIED, m.full_name


IMPLEMENTED = {"inference", "security", "trainer"}


def test_implemented_services_and_the_drafts_are_marked() -> None:
    for pkg in IMPLEMENTED:
        assert all(
            m.GetOptions().Extensions[options_pb2.method_policy].implemented
            for m in _service(pkg, SERVICES[pkg]).methods
        )
    for pkg, name in SERVICES.items():
        if pkg not in IMPLEMENTED:
            assert not any(
                m.GetOptions().Extensions[options_pb2.method_policy].implemented for m in _service(pkg, name).methods
            )


def test_sensitive_fields_are_marked() -> None:
    from llmesh.pb.inference.v1 import inference_pb2

    prompt = inference_pb2.GenerateRequest.DESCRIPTOR.fields_by_name["prompt"]
    policy = prompt.GetOptions().Extensions[options_pb2.field_policy]
    assert policy.sensitivity == options_pb2.SENSITIVITY_PII and policy.reversible
    from llmesh.pb.security.v1 import security_pb2

    secret = security_pb2.CreateApiKeyResponse.DESCRIPTOR.fields_by_name["secret"]
    assert secret.GetOptions().Extensions[options_pb2.field_policy].sensitivity == options_pb2.SENSITIVITY_SECRET


async def test_drafted_services_answer_unimplemented() -> None:
    from llmesh.pb.embedding.v1 import embedding_pb2, embedding_pb2_grpc

    server = grpc.aio.server()
    # The generated base class (abstract to mypy) answers UNIMPLEMENTED: what this checks.
    base = embedding_pb2_grpc.EmbeddingServicer()  # type: ignore[abstract]  # instantiated on purpose
    embedding_pb2_grpc.add_EmbeddingServicer_to_server(base, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await embedding_pb2_grpc.EmbeddingStub(ch).EmbedText(
                    embedding_pb2.EmbedTextRequest(texts=["x"]), timeout=5
                )
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(None)


def test_java_sources_generate(tmp_path: Path) -> None:
    # Debian's protoc (installed by scripts/setup.sh) carries the Java generator.
    protoc = shutil.which("protoc")
    assert protoc, "protoc not found: run scripts/setup.sh"
    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto"))
    subprocess.run([protoc, "-I", str(ROOT / "protos"), f"--java_out={tmp_path}", *protos], check=True, cwd=ROOT)
    for pkg, name in SERVICES.items():
        assert (tmp_path / "ai" / "llmesh" / pkg / "v1" / f"{name}Proto.java").is_file()
    assert (tmp_path / "ai/llmesh/inference/v1/GenerateRequest.java").is_file()
