"""What the trainer servicer hands to its domain modules, on a real SQLite store in a
temporary folder: dataset intake (limits, checks, content ids, stored files), job
hyperparameter checks, and the store's job queue SQL."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmesh.runtime.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from llmesh.runtime.sqlite import Database
from llmesh.services.trainer import datasets, job_params, store
from llmesh.services.trainer.intake import DRAIN_FACTOR, DatasetIntake, DatasetSpec, UploadBuffer, read_import

FAQ = "question,answer\n怎么申请年假？,在人事系统提交。\n如何重置密码？,在门户网站重置。\n".encode()
PAIRS = "今天天气很好\tThe weather is very good today.\n我爱你\tI love you.\n".encode()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = store.open_database(tmp_path / "trainer.db")
    database.open_sync()
    yield database
    database.close_sync()


def spec(name: str = "faq.csv", **kw: Any) -> DatasetSpec:
    return DatasetSpec(**({"name": name, "fmt": None, "sha256": "", "eval_fraction": 0.0, "seed": 0} | kw))


def intake(db: Database, tmp_path: Path, languages: tuple[str, str] = ("中文", "英文")) -> DatasetIntake:
    return DatasetIntake(db, tmp_path / "datasets", datasets.Languages(*languages))


# ---- upload limits ---------------------------------------------------------------------
def test_upload_buffer_keeps_chunks_up_to_the_limit() -> None:
    buf = UploadBuffer(10)
    assert buf.size == 0 and buf.data() == b""
    buf.add(b"12345")
    buf.add(b"67890")
    assert buf.started and buf.data() == b"1234567890"


def test_upload_buffer_drains_then_refuses() -> None:
    buf = UploadBuffer(10)
    buf.add(b"x" * 11)  # over the limit: still read, so the client sees the refusal
    buf.add(b"x" * (DRAIN_FACTOR * 10 - 11))
    with pytest.raises(InvalidArgument, match="larger than the limit of 10 bytes") as info:
        buf.data()
    assert info.value.field == "data"
    with pytest.raises(InvalidArgument):  # past DRAIN_FACTOR x the limit: refused at once
        buf.add(b"x")


def test_import_reads_inside_the_root_within_the_limit(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "faq.csv").write_bytes(FAQ)
    assert read_import(root, "faq.csv", len(FAQ)) == FAQ
    with pytest.raises(InvalidArgument, match="the file is larger than the limit") as info:
        read_import(root, "faq.csv", len(FAQ) - 1)
    assert info.value.field == "path"
    with pytest.raises(InvalidArgument, match="must not be empty"):
        read_import(root, "", 100)
    with pytest.raises(PermissionDenied, match="outside the allowed dataset root"):
        read_import(root, str(tmp_path / "trainer.db"), 100)


# ---- storing a dataset -----------------------------------------------------------------
def test_same_content_is_stored_once_under_its_content_id(db: Database, tmp_path: Path) -> None:
    it = intake(db, tmp_path)
    first = asyncio.run(it.store(spec(), FAQ, "t/alice"))
    again = asyncio.run(it.store(spec(name="other.csv"), FAQ.replace(b"\n", b"\r\n"), "t/bob"))
    assert first["dataset_id"] == again["dataset_id"] and len(first["dataset_id"]) == 24
    assert (first["name"], first["created_by"], first["format"]) == ("faq.csv", "t/alice", "csv_qa")  # first wins
    assert first["sha256"] == hashlib.sha256(FAQ).hexdigest()
    folder = tmp_path / "datasets" / first["dataset_id"]
    stored = datasets.from_jsonl((folder / "train.jsonl").read_bytes())
    held_out = datasets.from_jsonl((folder / "eval.jsonl").read_bytes())
    assert (len(stored), len(held_out)) == (1, 1)  # the default fraction never leaves eval empty
    assert [p.name for p in (tmp_path / "datasets").iterdir()] == [first["dataset_id"]]  # no temp folder left


def test_unset_eval_fraction_holds_out_a_tenth(db: Database, tmp_path: Path) -> None:
    rows = "".join(f"q{i},a{i}\n" for i in range(20))
    row = asyncio.run(intake(db, tmp_path).store(spec(eval_fraction=0.0), f"q,a\n{rows}".encode(), "t/a"))
    assert (row["train_examples"], row["eval_examples"]) == (18, 2)


@pytest.mark.parametrize(
    ("kw", "data", "field"),
    [
        ({"name": " "}, FAQ, "header.name"),
        ({}, b" \n", "data"),
        ({"sha256": "00" * 32}, FAQ, "header.sha256"),
        ({"fmt": "chat_jsonl"}, FAQ, "dataset"),
        ({"eval_fraction": 0.9}, FAQ, "eval_fraction"),
    ],
)
def test_bad_datasets_name_the_field(db: Database, tmp_path: Path, kw: dict[str, Any], data: bytes, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        asyncio.run(intake(db, tmp_path).store(spec(**kw), data, "t/a"))
    assert info.value.field == field
    assert db.call_sync(lambda c: c.execute("SELECT COUNT(*) FROM datasets").fetchone()[0]) == 0


def test_translation_pairs_use_the_configured_languages(db: Database, tmp_path: Path) -> None:
    row = asyncio.run(intake(db, tmp_path, ("中文", "法文")).store(spec("zh.tsv", fmt="tsv_translation"), PAIRS, "t/a"))
    train = datasets.from_jsonl((tmp_path / "datasets" / row["dataset_id"] / "train.jsonl").read_bytes())
    assert {ex.messages[0].content.split("：")[0] for ex in train} == {"将以下中文文本翻译成法文"}


# ---- job hyperparameters ---------------------------------------------------------------
def params(**kw: Any) -> dict[str, Any]:
    base = {
        "adapter_name": "faq",
        "rank": 8,
        "alpha": 16.0,
        "dropout": 0.0,
        "target_modules": [],
        "epochs": 3,
        "max_steps": 0,
        "learning_rate": 2e-4,
        "batch_size": 8,
        "max_length": 512,
        "seed": 0,
        "response_only_loss": True,
        "qlora": False,
        "min_improvement": 0.0,
    }
    return base | kw


def test_job_params_in_range_pass_unchanged() -> None:
    assert job_params.check(params()) == params()


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"adapter_name": "Bad Name"}, "adapter_name"),
        ({"rank": 257}, "lora.rank"),
        ({"dropout": 1.0}, "lora.dropout"),
        ({"epochs": 0}, "epochs"),
        ({"learning_rate": 1.5}, "learning_rate"),
        ({"batch_size": 2000}, "batch_size"),
        ({"max_length": 8}, "max_length"),
        ({"alpha": 0.0}, "lora.alpha"),
        ({"min_improvement": -2.0}, "min_improvement"),
    ],
)
def test_job_params_out_of_range_name_the_field(kw: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        job_params.check(params(**kw))
    assert info.value.field == field


def test_qlora_refused_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(job_params, "qlora_possible", lambda: False)
    with pytest.raises(FailedPrecondition, match="QLoRA needs a CUDA GPU"):
        job_params.check(params(qlora=True))


# ---- the job queue in the store --------------------------------------------------------
def test_jobs_queue_cancel_and_events(db: Database, tmp_path: Path) -> None:
    ds = asyncio.run(intake(db, tmp_path).store(spec(), FAQ, "t/a"))
    assert db.call_sync(lambda c: store.create_job(c, "job_x", "missing", params(), "t/a")) is None
    assert db.call_sync(lambda c: store.job_row(c, "job_x")) is None  # nothing written
    row = db.call_sync(lambda c: store.create_job(c, "job_1", ds["dataset_id"], params(), "t/a"))
    assert row is not None and (row["state"], row["adapter_name"]) == ("queued", "faq")
    db.call_sync(lambda c: store.create_job(c, "job_2", ds["dataset_id"], params(), "t/a"))
    assert [r["job_id"] for r in db.call_sync(lambda c: store.recent_jobs(c, 1))] == ["job_2"]
    cancelled = db.call_sync(lambda c: store.cancel_job(c, "job_1"))
    assert cancelled is not None and cancelled["state"] == "cancelled" and cancelled["finished_at"]
    again = db.call_sync(lambda c: store.cancel_job(c, "job_1"))
    assert again is not None and again["state"] == "cancelled"  # terminal: unchanged
    assert db.call_sync(lambda c: store.cancel_job(c, "job_none")) is None
    events, now = db.call_sync(lambda c: store.events_after(c, "job_1", 0))
    assert [e["kind"] for e in events] == ["queued", "cancelled"] and now is not None and now["state"] == "cancelled"
    later, _ = db.call_sync(lambda c: store.events_after(c, "job_1", events[0]["id"]))
    assert [e["kind"] for e in later] == ["cancelled"]


def test_running_job_is_flagged_not_cancelled(db: Database, tmp_path: Path) -> None:
    ds = asyncio.run(intake(db, tmp_path).store(spec(), FAQ, "t/a"))
    db.call_sync(lambda c: store.create_job(c, "job_1", ds["dataset_id"], params(), "t/a"))
    db.call_sync(lambda c: store.update_job(c, "job_1", state="running"))
    row = db.call_sync(lambda c: store.cancel_job(c, "job_1"))
    assert row is not None and (row["state"], row["cancel_requested"]) == (
        "running",
        1,
    )  # the worker stops at its next step
