"""The CLI as a client of the session mesh: with an API key (a file or the environment)
its calls go through the gateway — signed, audited under the key's owner — and a bad key
gets the gateway's reason in one line. The SDK's aio channels reach the same places."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from llmesh.client import ApiKey, gateway_aio_channel, local_aio_channel, sampling
from llmesh.client.trainer import upload
from llmesh.demo.models import faq_pairs
from llmesh.pb.inference.v1 import inference_pb2 as ipb
from llmesh.pb.inference.v1 import inference_pb2_grpc as ipb_grpc
from llmesh.pb.security.v1 import security_pb2 as spb
from llmesh.pb.trainer.v1 import trainer_pb2 as tpb
from llmesh.pb.trainer.v1 import trainer_pb2_grpc
from llmesh.runtime.files import address, write_secret
from tests.support.mesh import Mesh

# A small valid dataset: distinct pairs (duplicates are dropped).
PAIRS = "".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(6)).encode()
KEY_VARS = ("LLMESH_API_KEY_ID", "LLMESH_API_SECRET", "LLMESH_API_KEY_FILE", "LLMESH_GATEWAY")


def cli(
    mesh: Mesh, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in KEY_VARS}
    return subprocess.run(
        [sys.executable, "-m", "llmesh.cli", *args, "--config", str(mesh.config_path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**base, **(env or {})},
    )


def ok(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


@pytest.fixture(scope="module")
def client_key(mesh: Mesh) -> tuple[str, ApiKey]:
    """A fresh owner (so its audit records are this test's) with inference and trainer scopes."""
    owner = f"cli-{uuid.uuid4().hex[:8]}"
    created = mesh.security().CreateApiKey(
        spb.CreateApiKeyRequest(owner=owner, tenant="acme", scopes=["inference:*", "trainer:*"]), timeout=10
    )
    return owner, ApiKey(created.key.key_id, created.secret)


def audited(mesh: Mesh, actor: str, methods: set[str], timeout_s: float = 15) -> set[str]:
    """The methods audited under ``actor`` once all of ``methods`` are there (the gateway batches)."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = mesh.security().QueryAudit(spb.QueryAuditRequest(actor=actor, limit=1000), timeout=10).records
        seen = {r.action.rsplit("/", 1)[-1] for r in records}
        if methods <= seen or time.monotonic() > deadline:
            return seen
        time.sleep(0.3)


def test_client_commands_go_through_the_gateway_with_a_key(
    mesh: Mesh, client_key: tuple[str, ApiKey], tmp_path: Path
) -> None:
    owner, key = client_key
    key_file = tmp_path / "api-key.json"
    write_secret(key_file, json.dumps({"key_id": key.key_id, "secret": key.secret}))
    by_file = ["--api-key-file", str(key_file)]
    by_env = {"LLMESH_API_KEY_ID": key.key_id, "LLMESH_API_SECRET": key.secret}

    ok(cli(mesh, "generate", "你好", "--max-tokens", "2", *by_file))
    ok(cli(mesh, "generate", "你好", "--max-tokens", "2", "--stream", env=by_env))
    assert "translation" in ok(cli(mesh, "templates", env=by_env))
    ok(cli(mesh, "adapters", "list", *by_file))

    data = tmp_path / "pairs.jsonl"
    rows = [{"instruction": p["question"], "output": p["answer"]} for p in faq_pairs()[:4]]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    name = f"{owner}-lora"
    out = ok(
        cli(
            mesh,
            "train",
            str(data),
            "--name",
            name,
            "--max-steps",
            "1",
            "--batch-size",
            "2",
            "--watch",
            *by_file,
            timeout=300,
        )
    )
    assert f"{name}@v1" in out and "succeeded" in out
    assert f"{name}@v1" in ok(cli(mesh, "adapters", "list", name, env=by_env))
    ok(cli(mesh, "adapters", "delete", f"{name}@v1", env=by_env))

    # Every call above was the key owner's, through the gateway (the local path audits nothing).
    expected = {"Generate", "GenerateStream", "ListTemplates", "ListAdapters", "UploadDataset", "CreateJob", "WatchJob"}
    seen = audited(mesh, owner, expected | {"DeleteAdapter"})
    assert expected | {"DeleteAdapter"} <= seen, seen


def test_without_a_key_or_with_local_client_commands_call_the_service(mesh: Mesh) -> None:
    assert "translation" in ok(cli(mesh, "templates"))
    # --local wins over a configured key (one the gateway would refuse): straight to the service.
    bogus = {"LLMESH_API_KEY_ID": "key_nonexistent", "LLMESH_API_SECRET": "nope"}
    assert "translation" in ok(cli(mesh, "templates", "--local", env=bogus))
    assert cli(mesh, "templates", env=bogus).returncode == 1


def test_a_bad_key_gets_the_gateways_reason_in_one_line(mesh: Mesh) -> None:
    def refusal(key_id: str) -> str:
        out = cli(mesh, "generate", "hi", env={"LLMESH_API_KEY_ID": key_id, "LLMESH_API_SECRET": "nope"})
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
        return lines[0]

    unknown = refusal("lk_" + "0" * 32)
    assert unknown.startswith("UNAUTHENTICATED: ") and "check the API key" in unknown, unknown
    malformed = refusal("key_nonexistent")
    assert malformed.startswith("INVALID_ARGUMENT: key_id: ") and "(field key_id)" in malformed, malformed


def test_aio_channels_through_the_gateway_and_locally(mesh: Mesh, client_key: tuple[str, ApiKey]) -> None:
    _, key = client_key
    gateway = address("127.0.0.1", mesh.cfg.gateway.server.port)

    async def calls() -> tuple[str, int, str, list[str]]:  # the reply, stream chunks, dataset, templates
        async with gateway_aio_channel(gateway, key) as channel:
            inference = ipb_grpc.InferenceStub(channel)
            reply = await inference.Generate(
                ipb.GenerateRequest(prompt="你好", sampling=sampling(max_tokens=2)), timeout=60
            )
            chunks = [m async for m in inference.GenerateStream(ipb.GenerateRequest(prompt="hi"), timeout=60)]

            # A signed client stream: the first message is read and signed before the call starts.
            async def parts() -> AsyncIterator[tpb.UploadDatasetRequest]:
                header = tpb.DatasetHeader(name="aio.jsonl", sha256=hashlib.sha256(PAIRS).hexdigest())
                yield tpb.UploadDatasetRequest(header=header)
                yield tpb.UploadDatasetRequest(data=PAIRS)

            ds = await trainer_pb2_grpc.TrainerStub(channel).UploadDataset(parts(), timeout=60)
        async with local_aio_channel(mesh.address, mesh.cfg.home) as direct:
            names = [
                t.name
                for t in (
                    await ipb_grpc.InferenceStub(direct).ListTemplates(ipb.ListTemplatesRequest(), timeout=10)
                ).templates
            ]
        return reply.text, len(chunks), ds.dataset_id, names

    _, chunks, dataset_id, names = asyncio.run(calls())
    assert chunks >= 1 and dataset_id and "translation" in names


def test_sync_upload_helper_through_the_gateway(mesh: Mesh, client_key: tuple[str, ApiKey]) -> None:
    from llmesh.client import gateway_channel

    _, key = client_key
    trainer = trainer_pb2_grpc.TrainerStub(gateway_channel(address("127.0.0.1", mesh.cfg.gateway.server.port), key))
    ds = upload(trainer, PAIRS, "sync.jsonl")
    assert ds.dataset_id and ds.train_examples + ds.eval_examples == 6
