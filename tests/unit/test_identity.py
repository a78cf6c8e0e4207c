"""Internal identity: minted by the gateway, required by services."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from llmesh.pb.inference.v1 import inference_pb2 as pb
from llmesh.pb.inference.v1 import inference_pb2_grpc as pb_grpc
from llmesh.runtime.errors import Unauthenticated
from llmesh.runtime.identity import IDENTITY_KEY, IdentityInterceptor, InternalIdentity, Principal, load_secret

ALICE = Principal("alice", "acme", frozenset({"inference:generate"}), frozenset({"user"}))


def test_secret_is_created_once_and_private(tmp_path: Path) -> None:
    a, b = load_secret(tmp_path), load_secret(tmp_path)
    assert a == b and len(a) == 32
    assert (tmp_path / "security" / "internal.key").stat().st_mode & 0o777 == 0o600


def test_round_trip_expiry_and_foreign_keys(tmp_path: Path) -> None:
    ident = InternalIdentity(load_secret(tmp_path))
    assert ident.verify(ident.mint(ALICE)) == ALICE
    with pytest.raises(Unauthenticated, match="expired"):
        ident.verify(ident.mint(ALICE, now=time.time() - 600))
    with pytest.raises(Unauthenticated):
        ident.verify(InternalIdentity(b"x" * 32).mint(ALICE))
    with pytest.raises(Unauthenticated):
        ident.verify("not-a-token")


class Echo(pb_grpc.InferenceServicer):
    def __init__(self, ident: InternalIdentity) -> None:
        self.ident = ident

    async def Generate(self, request, context):
        p = self.ident.principal(context)
        return pb.GenerateResponse(text=f"{p.subject}@{p.tenant}")


async def test_services_refuse_calls_without_identity(tmp_path: Path) -> None:
    ident = InternalIdentity(load_secret(tmp_path))
    server = grpc.aio.server(interceptors=[IdentityInterceptor(ident)])
    pb_grpc.add_InferenceServicer_to_server(Echo(ident), server)  # type: ignore[abstract]  # serves one RPC; grpc answers UNIMPLEMENTED for the rest
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.InferenceStub(ch)
            ok = await stub.Generate(
                pb.GenerateRequest(prompt="x"), metadata=((IDENTITY_KEY, ident.mint(ALICE)),), timeout=5
            )
            assert ok.text == "alice@acme"
            for md in ((), ((IDENTITY_KEY, "forged"),), ((IDENTITY_KEY, InternalIdentity(b"k" * 32).mint(ALICE)),)):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Generate(pb.GenerateRequest(prompt="x"), metadata=md, timeout=5)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as e:  # streaming shapes are refused too
                [m async for m in stub.GenerateStream(pb.GenerateRequest(prompt="x"), timeout=5)]
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # A valid identity without the method's scope (inference:generate) is refused.
            reader = Principal("bob", "acme", frozenset({"inference:read"}))
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Generate(
                    pb.GenerateRequest(prompt="x"), metadata=((IDENTITY_KEY, ident.mint(reader)),), timeout=5
                )
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await server.stop(None)


def test_policy_comes_from_the_proto_options() -> None:
    from llmesh.runtime.policy import policy_for

    p = policy_for("/llmesh.inference.v1.Inference/Generate")
    assert p is not None and p.scope == "inference:generate" and not p.anonymous
    assert policy_for("/llmesh.inference.v1.Inference/Nope") is None
    assert policy_for("not-a-path") is None


def test_tokens_are_reused_and_verifications_cached(tmp_path: Path) -> None:
    ident = InternalIdentity(load_secret(tmp_path))
    first = ident.mint(ALICE)
    assert ident.mint(ALICE) == first  # re-minted only after half the lifetime
    assert ident.mint(Principal("bob", "acme")) != first
    assert ident.verify(first) == ALICE and ident.verify(first) == ALICE
    with pytest.raises(Unauthenticated):  # a cached good token does not vouch for a tampered one
        ident.verify(first[:-2] + ("AA" if not first.endswith("AA") else "BB"))
