"""Malformed protobuf against every public method of the real mesh.

The methods are the ones the gateway's reflection lists (routed services, health and
reflection). Each gets bodies that are not valid for its request type — truncated,
invalid tags, an over-long varint, an unterminated group, invalid UTF-8 in a string
field, random bytes — with valid credentials and a signature over those very bytes, in
its own shape (client streams keep their side open: only the refusal may end the
call). Every one must come back INVALID_ARGUMENT naming the type, promptly, with no
Python class name or traceback; the same bytes straight to each service's internal port
too; and the mesh must still serve afterwards."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from llmesh.auth.signature import sign
from llmesh.client import ApiKey, gateway_channel, local_channel, sampling
from llmesh.pb.inference.v1 import inference_pb2, inference_pb2_grpc
from llmesh.pb.security.v1 import security_pb2 as spb
from llmesh.runtime.policy import policy_for
from llmesh.services.gateway.routes import PUBLIC_SERVICES, service_descriptor
from tests.support.mesh import Mesh

DEADLINE_S = 10.0
PROMPT_S = 5.0  # a refusal arrives well before the deadline
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}


@dataclass(frozen=True)
class Method:
    path: str
    descriptor: MethodDescriptor

    @property
    def request_type(self) -> Descriptor:
        return self.descriptor.input_type


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    seconds: float


def _reflected(channel: grpc.Channel) -> list[Method]:
    """Every method of every service the server's reflection lists, with the request
    descriptors as reflection serves them (not this process's generated code)."""
    db = ProtoReflectionDescriptorDatabase(channel)
    pool = DescriptorPool(db)
    methods = []
    for name in sorted(db.get_services()):
        for m in pool.FindServiceByName(name).methods:
            methods.append(Method(f"/{name}/{m.name}", m))
    return methods


def _tag(number: int, wire_type: int) -> bytes:
    value, out = (number << 3) | wire_type, bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes([*out, value])


def _parses(request_type: Descriptor, body: bytes) -> bool:
    try:
        GetMessageClass(request_type).FromString(body)
    except Exception:
        return False
    return True


def malformed_bodies(request_type: Descriptor, rng: random.Random) -> list[tuple[str, bytes]]:
    """Named bodies that do not parse as ``request_type`` (each checked here)."""
    candidates = [
        ("truncated length-delimited field", b"\x0a\x05ab"),
        ("truncated varint", b"\x08\x80"),
        ("field number 0", b"\x00\x01"),
        ("invalid wire type", b"\x0f\x01"),
        ("over-long varint", b"\x08" + b"\xff" * 10 + b"\x01"),
        ("unterminated group", b"\x0b\x08\x01"),
    ]
    strings = [f for f in request_type.fields if f.type == FieldDescriptor.TYPE_STRING]
    if strings:
        candidates.append((f"invalid UTF-8 in {strings[0].name}", _tag(strings[0].number, 2) + b"\x03a\xff\xfe"))
    for i in range(3):
        candidates.append((f"random bytes #{i}", rng.randbytes(rng.randint(1, 48))))
    return [(name, body) for name, body in candidates if not _parses(request_type, body)]


def call_raw(channel: grpc.Channel, method: Method, messages: list[bytes], metadata: list[tuple[str, str]]) -> Outcome:
    """One call of ``method`` with raw request bytes, in the method's own shape; a client
    stream stays open after its messages until the call has ended."""
    d, started = method.descriptor, time.monotonic()
    ended = threading.Event()

    def requests() -> Iterator[bytes]:
        yield from messages
        ended.wait(DEADLINE_S)

    md, path = tuple(metadata), method.path
    try:
        if d.client_streaming and d.server_streaming:
            bidi: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(path)
            for _ in bidi(requests(), metadata=md, timeout=DEADLINE_S):
                pass
        elif d.client_streaming:
            upload: grpc.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(path)
            upload(requests(), metadata=md, timeout=DEADLINE_S)
        elif d.server_streaming:
            stream: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(path)
            for _ in stream(messages[0], metadata=md, timeout=DEADLINE_S):
                pass
        else:
            unary: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
            unary(messages[0], metadata=md, timeout=DEADLINE_S)
    except grpc.RpcError as e:
        return Outcome(e.code(), e.details() or "", time.monotonic() - started)
    finally:
        ended.set()
    return Outcome(grpc.StatusCode.OK, "", time.monotonic() - started)


def _leaks(details: str) -> bool:
    return "<class" in details or "Traceback" in details or "Error parsing" in details


@pytest.fixture(scope="module")
def gateway(mesh: Mesh) -> Iterator[grpc.Channel]:
    ch = grpc.insecure_channel(f"127.0.0.1:{mesh.cfg.gateway.server.port}")
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def methods(gateway: grpc.Channel) -> list[Method]:
    found = _reflected(gateway)
    names = {m.path.split("/")[1] for m in found}
    assert {"llmesh.inference.v1.Inference", "llmesh.security.v1.Security", "grpc.health.v1.Health"} <= names
    return found


def _signer(mesh: Mesh, scopes: list[str]) -> tuple[ApiKey, str]:
    """A key of its own (its own rate-limit bucket) with ``scopes``, and its token."""
    sec = mesh.security()
    created = sec.CreateApiKey(spb.CreateApiKeyRequest(owner="fuzz", tenant="fuzz", scopes=scopes), timeout=10)
    key = ApiKey(created.key.key_id, created.secret)
    token = sec.IssueToken(spb.IssueTokenRequest(key_id=key.key_id, secret=key.secret), timeout=10).token
    return key, token


def _every_scope(methods: list[Method]) -> list[str]:
    """The scopes the methods' policies require (from the generated descriptors)."""
    for name in PUBLIC_SERVICES:
        service_descriptor(name)  # imported, so that ``policy_for`` finds its methods
    return sorted({p.scope for m in methods if (p := policy_for(m.path)) is not None and p.scope})


def test_every_public_method_refuses_malformed_bodies(mesh: Mesh, gateway: grpc.Channel, methods: list[Method]) -> None:
    scopes = _every_scope(methods)
    assert "security:admin" in scopes and "inference:generate" in scopes
    rng = random.Random(8)
    failures: list[str] = []
    for method in methods:
        # One key per method: a method's bodies never share a rate-limit bucket with others'.
        key, token = _signer(mesh, scopes)
        bodies = malformed_bodies(method.request_type, rng)
        assert len(bodies) >= 6, f"{method.path}: too few malformed bodies for its type"
        variants = [(name, [body]) for name, body in bodies]
        if method.descriptor.client_streaming:  # a bad message after a good one
            variants += [(f"valid message, then {name}", [b"", body]) for name, body in bodies[:2]]
        for name, messages in variants:
            md = [
                ("authorization", f"Bearer {token}"),
                *sign(key.secret.encode(), method.path, messages[0], key_id=key.key_id),
            ]
            out = call_raw(gateway, method, messages, md)
            what = f"{method.path} [{name}]: {out.code.name} {out.details!r} after {out.seconds:.1f}s"
            if len(messages) == 1:
                expected = f"request body is not a valid {method.request_type.full_name}"
                if out.code != grpc.StatusCode.INVALID_ARGUMENT or out.details != expected:
                    failures.append(what)
            elif out.code in NEVER or out.code == grpc.StatusCode.OK:
                failures.append(what)  # whoever answers first, the answer is a clear refusal
            if _leaks(out.details) or out.seconds > PROMPT_S:
                failures.append(what)
    assert not failures, "\n".join(failures)


def test_services_refuse_malformed_bodies_on_their_internal_port(mesh: Mesh) -> None:
    rng = random.Random(5)
    failures: list[str] = []
    for address in sorted(set(mesh.cfg.gateway.upstreams.values())):
        channel = local_channel(address, mesh.cfg.home, retries=False)  # the host's internal identity
        try:
            for method in _reflected(channel):
                for name, body in malformed_bodies(method.request_type, rng)[:4]:
                    out = call_raw(channel, method, [body], [])
                    expected = f"request body is not a valid {method.request_type.full_name}"
                    refused = out.code == grpc.StatusCode.INVALID_ARGUMENT and out.details == expected
                    # A servicer that answers a client stream without reading it (an
                    # unimplemented one) never sees the bad message: any clear status.
                    clear = method.descriptor.client_streaming and out.code not in NEVER | {grpc.StatusCode.OK}
                    if not (refused or clear) or _leaks(out.details) or out.seconds > PROMPT_S:
                        failures.append(f"{address}{method.path} [{name}]: {out.code.name} {out.details!r}")
        finally:
            channel.close()
    assert not failures, "\n".join(failures)


def test_the_mesh_still_serves_after_the_fuzzing(mesh: Mesh, gateway: grpc.Channel) -> None:
    for address in [f"127.0.0.1:{mesh.cfg.gateway.server.port}", *sorted(set(mesh.cfg.gateway.upstreams.values()))]:
        with grpc.insecure_channel(address) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING, address
    key, _ = _signer(mesh, ["inference:*"])
    stub = inference_pb2_grpc.InferenceStub(gateway_channel(f"127.0.0.1:{mesh.cfg.gateway.server.port}", key))
    reply = stub.Generate(inference_pb2.GenerateRequest(prompt="hello", sampling=sampling(max_tokens=3)), timeout=30)
    assert reply.usage.completion_tokens > 0
