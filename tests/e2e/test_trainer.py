"""Dataset → LoRA job → evaluated adapter → published → served, through the gateway,
with the real trainer worker, Triton and registry; bad datasets refused with row numbers;
a worker killed mid-job resumes from its checkpoint."""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from llmesh.client import ApiKey, gateway_channel, local_channel, sampling
from llmesh.demo.job import RANDOM_LM_FAQ_JOB
from llmesh.demo.models import faq_pairs
from llmesh.pb.inference.v1 import inference_pb2 as ipb
from llmesh.pb.inference.v1 import inference_pb2_grpc as igrpc
from llmesh.pb.security.v1 import security_pb2 as spb
from llmesh.pb.trainer.v1 import trainer_pb2 as pb
from llmesh.pb.trainer.v1 import trainer_pb2_grpc as pb_grpc
from tests.support.mesh import Mesh
from tests.support.tickets import ticket_rows

FAQ = json.dumps(faq_pairs(), ensure_ascii=False).encode()


def job_request(template: pb.CreateJobRequest, dataset_id: str, adapter_name: str) -> pb.CreateJobRequest:
    request = pb.CreateJobRequest(dataset_id=dataset_id, adapter_name=adapter_name)
    request.MergeFrom(template)
    return request


@pytest.fixture(scope="module")
def channel(mesh: Mesh) -> Iterator[grpc.Channel]:
    sec = mesh.security()
    created = sec.CreateApiKey(
        spb.CreateApiKeyRequest(owner="ml-engineer", tenant="acme", scopes=["trainer:*", "inference:*"]), timeout=10
    )
    ch = gateway_channel(f"127.0.0.1:{mesh.cfg.gateway.server.port}", ApiKey(created.key.key_id, created.secret))
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def trainer(channel: grpc.Channel) -> pb_grpc.TrainerStub:
    return pb_grpc.TrainerStub(channel)


def upload(
    trainer: pb_grpc.TrainerStub, data: bytes, name: str, *, eval_fraction: float = 0, seed: int = 0, sha256: str = ""
) -> pb.Dataset:
    header = pb.DatasetHeader(name=name, eval_fraction=eval_fraction, seed=seed, sha256=sha256)
    parts = [pb.UploadDatasetRequest(header=header)]
    parts += [pb.UploadDatasetRequest(data=data[i : i + 4096]) for i in range(0, len(data), 4096)]
    return trainer.UploadDataset(iter(parts), timeout=60)


def wait(trainer: pb_grpc.TrainerStub, job_id: str, timeout_s: float = 240) -> tuple[pb.Job, list[str]]:
    kinds, job = [], None
    for event in trainer.WatchJob(pb.GetJobRequest(job_id=job_id), timeout=timeout_s):
        kinds.append(event.kind)
        job = event.job
    assert job is not None
    return job, kinds


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def test_train_evaluate_publish_and_serve_through_the_gateway(
    mesh: Mesh, channel: grpc.Channel, trainer: pb_grpc.TrainerStub
) -> None:
    ds = upload(trainer, FAQ, "faq.json", eval_fraction=0.1, seed=3)
    assert ds.train_examples + ds.eval_examples == 20 and ds.eval_examples == 2
    assert (
        upload(trainer, FAQ, "again.json", eval_fraction=0.1, seed=3).dataset_id == ds.dataset_id
    )  # content-addressed
    # the random test LM needs the demo's explicit values (the defaults are chosen on SmolLM2)
    job = trainer.CreateJob(job_request(RANDOM_LM_FAQ_JOB, ds.dataset_id, "helpdesk"), timeout=30)
    # 20 rows: memorised, every row trained on (the 2 held out at upload too), explicit values kept
    plan = job.plan
    assert plan.mode == pb.TRAINING_MODE_MEMORISE and plan.train_examples == 20 and plan.held_out_examples == 0
    assert (plan.epochs, plan.batch_size, plan.rank, plan.steps) == (60, 4, 16, 300) and "20 rows < 50" in plan.reason
    job, kinds = wait(trainer, job.job_id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    assert job.adapter == "helpdesk@v1" and "progress" in kinds and "evaluated" in kinds
    assert job.progress.step == job.progress.total_steps > 0 and job.plan.prompt_format == "chat"
    # The evaluation is the reproduction of the training answers, greedy, exact.
    assert job.tuned.split == "train" and job.tuned.examples == 20
    assert job.tuned.exact_match >= 0.9 and job.passed and job.base.exact_match == 0
    assert job.tuned.loss < job.base.loss and job.tuned.perplexity < job.base.perplexity
    store = mesh.cfg.adapter_dir
    assert (store / "helpdesk@v1" / "adapter_config.json").is_file() and (store / "helpdesk@v1" / "loss.png").is_file()
    lineage = json.loads((store / "helpdesk@v1" / "lineage.json").read_text())
    assert lineage["dataset_id"] == ds.dataset_id and lineage["job_id"] == job.job_id
    assert lineage["prompt_format"] == "chat" and lineage["outcome"]["passed"]

    adapter = trainer.PromoteAdapter(pb.PromoteAdapterRequest(ref="helpdesk@v1"), timeout=30)
    assert list(adapter.aliases) == ["live"] and adapter.base_model_sha256 and adapter.prompt_format == "chat"
    assert trainer.GetAdapter(pb.GetAdapterRequest(ref="helpdesk@live"), timeout=10).version == 1

    # Served by the running Triton without a restart: trained answers come back.
    inference = igrpc.InferenceStub(channel)
    train_pairs = [p for p in faq_pairs() if len(p["answer"]) < 120][:4]
    greedy = sampling(temperature=0.0, max_tokens=160)
    hits = 0
    for pair in train_pairs:
        tuned = inference.Chat(
            ipb.ChatRequest(message=pair["question"], adapter="helpdesk", sampling=greedy), timeout=120
        )
        base = inference.Chat(ipb.ChatRequest(message=pair["question"], sampling=greedy), timeout=120)
        hits += tuned.reply.content.strip() == pair["answer"]
        assert base.reply.content.strip() != pair["answer"]
        # One prompt format: Generate (chat template applied, not raw) answers as Chat does.
        generated = inference.Generate(
            ipb.GenerateRequest(prompt=pair["question"], adapter="helpdesk", sampling=greedy), timeout=120
        )
        assert generated.text == tuned.reply.content
    assert hits >= len(train_pairs) - 1, f"only {hits} of {len(train_pairs)} trained answers reproduced"
    triton_pid = mesh.pid("tritonserver")
    assert psutil.Process(triton_pid).is_running()  # the same server process served it

    # Registry rules: delete refused while aliased; rollback needs history.
    code, _ = code_of(lambda: trainer.DeleteAdapter(pb.DeleteAdapterRequest(ref="helpdesk@v1"), timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    code, _ = code_of(lambda: trainer.RollbackAdapter(pb.RollbackAdapterRequest(name="helpdesk"), timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_a_restarted_triton_serves_the_published_adapter(mesh: Mesh, channel: grpc.Channel) -> None:
    """The store is the source of truth: a Triton process that never saw the adapter (the
    launcher restarts it after a crash) loads it on first use."""
    old = mesh.pid("tritonserver")
    os.kill(old, signal.SIGKILL)
    inference = igrpc.InferenceStub(channel)
    pair = next(p for p in faq_pairs() if len(p["answer"]) < 120)
    greedy = sampling(temperature=0.0, max_tokens=160)
    deadline = time.monotonic() + 240
    while True:
        try:
            reply = inference.Chat(
                ipb.ChatRequest(message=pair["question"], adapter="helpdesk@live", sampling=greedy), timeout=60
            )
            if mesh.pid("tritonserver") != old:
                break
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e.details()
        assert time.monotonic() < deadline, "triton did not come back"
        time.sleep(0.5)
    assert reply.reply.content.strip() == pair["answer"]


def test_cli_train_list_show_and_export(mesh: Mesh, tmp_path: Path) -> None:
    import subprocess
    import sys

    def cli(*args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "llmesh.cli", *args, "--config", str(mesh.config_path)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        return out.stdout

    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"instruction": p["question"], "output": p["answer"]}, ensure_ascii=False) + "\n"
            for p in faq_pairs()[:6]
        )
    )
    out = cli("train", str(data), "--name", "cli-demo", "--epochs", "2", "--batch-size", "2", "--watch")
    assert "succeeded" in out and "cli-demo@v1" in out
    assert "plan: memorise: 6 steps (2 epochs) over 6 rows, no held-out split" in out and "why: 6 rows < 50" in out
    assert "reproduced" in out and "answers exactly" in out
    job_id = next(line.split("=", 1)[1] for line in out.splitlines() if line.startswith("job_id="))
    assert "plan: memorise" in cli("jobs", "show", job_id) and job_id in cli("jobs", "list")
    assert "cli-demo@v1" in cli("adapters", "list", "cli-demo")
    shown = json.loads(cli("adapters", "show", "cli-demo"))
    assert shown["ref"] == "cli-demo@v1" and shown["hyperparameters"]["epochs"] == "2"
    cli("adapters", "export", "cli-demo@v1", str(tmp_path / "merged"))
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "merged" / "lineage.json").is_file()
    cli("adapters", "delete", "cli-demo@v1")
    assert not (mesh.cfg.adapter_dir / "cli-demo@v1").exists()


def test_ab_split_routes_callers_stickily_with_per_arm_metrics(mesh: Mesh, trainer: pb_grpc.TrainerStub) -> None:
    import urllib.request

    from llmesh.runtime.identity import Principal

    ds = upload(trainer, FAQ, "faq.json", eval_fraction=0.1, seed=3)
    for _ in range(2):  # ab@v1, ab@v2
        job = trainer.CreateJob(
            # generalise: the evaluation is the 2 held-out rows, not the reproduction of all 20
            pb.CreateJobRequest(
                dataset_id=ds.dataset_id, adapter_name="ab", epochs=1, seed=4, mode=pb.TRAINING_MODE_GENERALISE
            ),
            timeout=30,
        )
        assert wait(trainer, job.job_id)[0].state == pb.JOB_STATE_SUCCEEDED
    trainer.SetSplit(
        pb.SetSplitRequest(name="ab", arms=[pb.SplitArm(version=1, weight=1), pb.SplitArm(version=2, weight=1)]),
        timeout=30,
    )
    served: dict[str, set[str]] = {}
    req = ipb.GenerateRequest(prompt="hi", adapter="ab", sampling=sampling(max_tokens=2))
    for i in range(24):
        who = Principal(f"user{i}", "acme", frozenset({"inference:*"}))
        stub = igrpc.InferenceStub(local_channel(mesh.address, mesh.cfg.home, who))
        served[who.subject] = {stub.Generate(req, timeout=60).adapter for _ in range(2)}
    assert all(len(arms) == 1 for arms in served.values())  # sticky per caller
    assert set().union(*served.values()) == {"ab@v1", "ab@v2"}  # both arms get traffic
    metrics = (
        urllib.request.urlopen(f"http://127.0.0.1:{mesh.cfg.inference.server.metrics_port}/metrics", timeout=10)
        .read()
        .decode()
    )
    for arm in ("ab@v1", "ab@v2"):
        assert f'llmesh_adapter_requests_total{{adapter="{arm}",outcome="ok"}}' in metrics
        assert f'llmesh_adapter_latency_seconds_count{{adapter="{arm}"}}' in metrics


def test_a_large_dataset_generalises_with_early_stopping(mesh: Mesh, trainer: pb_grpc.TrainerStub) -> None:
    """60 rows: 10% held out, held-out loss checked periodically, stopped after two checks
    without improvement, the best step's adapter kept and published."""
    data = json.dumps(ticket_rows(60, seed=5)).encode()
    ds = upload(trainer, data, "tickets.json", eval_fraction=0.1, seed=1)
    assert (ds.train_examples, ds.eval_examples) == (54, 6)
    # lr this high overfits the tiny LM fast: the held-out loss turns up, and early stopping must act
    request = pb.CreateJobRequest(dataset_id=ds.dataset_id, adapter_name="tickets", epochs=30, learning_rate=2e-2)
    job = trainer.CreateJob(request, timeout=30)
    plan = job.plan
    assert plan.mode == pb.TRAINING_MODE_GENERALISE and (plan.train_examples, plan.held_out_examples) == (54, 6)
    assert plan.patience == 2 and plan.eval_every_steps > 0 and plan.steps == 30 * 7 and "60 rows >= 50" in plan.reason
    final, kinds = wait(trainer, job.job_id, timeout_s=600)
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    assert kinds.count("checked") >= 3 and "stopped" in kinds
    assert final.progress.step < final.progress.total_steps  # stopped early
    assert 0 < final.best_step < final.progress.step and final.tuned.split == "held_out" and final.tuned.examples == 6
    assert final.passed == (final.tuned.loss < final.base.loss)


def test_bad_datasets_are_refused_with_row_numbers(mesh: Mesh, trainer: pb_grpc.TrainerStub) -> None:
    before = len(trainer.ListAdapters(pb.ListAdaptersRequest(), timeout=10).adapters)
    cases = {
        b'{"instruction": "a", "output": "b"}\n{broken\n{"instruction": "c"}\n': "row 2",
        b"": "empty",
        b'[{"question": "q"}]': "row 1",
    }
    for data, expect in cases.items():
        name = "bad.jsonl" if data.startswith(b"{") else "bad.json"
        code, details = code_of(functools.partial(upload, trainer, data, name))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and expect in details, (data, details)
    big = b'{"instruction": "q", "output": "a"}\n' * (mesh.cfg.trainer.max_dataset_bytes // 30)
    code, details = code_of(lambda: upload(trainer, big, "big.jsonl"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "limit" in details
    code, _ = code_of(lambda: upload(trainer, FAQ, "faq.json", sha256="0" * 64))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    (mesh.cfg.dataset_root / "pairs.tsv").write_text(
        "怎么申请年假？\t在人事系统提交。\nHow to book a room?\tUse the calendar.\n"
    )
    imported = trainer.ImportDataset(pb.ImportDatasetRequest(path="pairs.tsv"), timeout=10)
    assert imported.train_examples + imported.eval_examples == 2 and imported.format == pb.DATASET_FORMAT_TSV_QA
    for path in ("../../etc/passwd", "/etc/passwd"):
        code, _ = code_of(functools.partial(trainer.ImportDataset, pb.ImportDatasetRequest(path=path), timeout=10))
        assert code == grpc.StatusCode.PERMISSION_DENIED, path
    code, _ = code_of(lambda: trainer.CreateJob(pb.CreateJobRequest(dataset_id="nope", adapter_name="x"), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = code_of(
        lambda: trainer.CreateJob(pb.CreateJobRequest(dataset_id="nope", adapter_name="Bad Name"), timeout=10)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = code_of(
        lambda: trainer.CreateJob(pb.CreateJobRequest(dataset_id="nope", adapter_name="x", qlora=True), timeout=10)
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION  # no CUDA GPU here
    assert len(trainer.ListAdapters(pb.ListAdaptersRequest(), timeout=10).adapters) == before  # nothing half-written


def _worker(mesh: Mesh, job_id: str) -> psutil.Process | None:
    for p in psutil.Process(mesh.pid("trainer")).children(recursive=True):
        if job_id in " ".join(p.cmdline()):
            return p
    return None


def test_a_killed_worker_resumes_from_its_checkpoint(mesh: Mesh, trainer: pb_grpc.TrainerStub) -> None:
    ds = upload(trainer, FAQ, "faq.json", eval_fraction=0.1, seed=3)
    job = trainer.CreateJob(
        pb.CreateJobRequest(
            dataset_id=ds.dataset_id,
            adapter_name="faq-resume",
            epochs=40,
            batch_size=2,
            lora=pb.LoraConfig(rank=4),
            seed=2,
        ),
        timeout=30,
    )
    every = mesh.cfg.trainer.checkpoint_every_steps
    deadline = time.monotonic() + 120
    while trainer.GetJob(pb.GetJobRequest(job_id=job.job_id), timeout=10).progress.step <= every:
        assert time.monotonic() < deadline, "job made no progress"
        time.sleep(0.1)
    worker = _worker(mesh, job.job_id)
    assert worker is not None
    os.kill(worker.pid, signal.SIGKILL)  # a crash, not a clean stop
    final, kinds = wait(trainer, job.job_id, timeout_s=600)  # memorised: all 20 answers are generated twice
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    assert final.attempts == 2 and "crashed" in kinds and "resumed" in kinds
    assert final.progress.step == final.progress.total_steps


def test_cancel_a_running_and_a_queued_job(mesh: Mesh, trainer: pb_grpc.TrainerStub) -> None:
    ds = upload(trainer, FAQ, "faq.json", eval_fraction=0.1, seed=3)
    long = pb.CreateJobRequest(epochs=500, batch_size=2, lora=pb.LoraConfig(rank=4))
    running = trainer.CreateJob(job_request(long, ds.dataset_id, "cancel-me"), timeout=30)
    queued = trainer.CreateJob(job_request(long, ds.dataset_id, "cancel-me-too"), timeout=30)
    deadline = time.monotonic() + 120
    while trainer.GetJob(pb.GetJobRequest(job_id=running.job_id), timeout=10).progress.step == 0:
        assert time.monotonic() < deadline, "job did not start"
        time.sleep(0.1)
    assert trainer.CancelJob(pb.CancelJobRequest(job_id=queued.job_id), timeout=10).state == pb.JOB_STATE_CANCELLED
    trainer.CancelJob(pb.CancelJobRequest(job_id=running.job_id), timeout=10)
    final, kinds = wait(trainer, running.job_id)
    assert (
        final.state == pb.JOB_STATE_CANCELLED
        and "cancelled" in kinds
        and final.progress.step < final.progress.total_steps
    )
    names = {a.name for a in trainer.ListAdapters(pb.ListAdaptersRequest(), timeout=10).adapters}
    assert not names & {"cancel-me", "cancel-me-too"}
    code, _ = code_of(lambda: trainer.CancelJob(pb.CancelJobRequest(job_id="job_missing"), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND
