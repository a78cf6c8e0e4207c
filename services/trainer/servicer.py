"""Trainer servicer: datasets in, jobs queued and watched, adapters registered and
promoted. Training itself runs in worker processes started by ``JobRunner``."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from google.protobuf import timestamp_pb2

from llmesh.adapter_store import DEFAULT_ALIAS, folder
from llmesh.pb.trainer.v1 import trainer_pb2 as pb
from llmesh.pb.trainer.v1 import trainer_pb2_grpc as pb_grpc
from llmesh.config import MeshConfig
from llmesh.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from llmesh.runtime.identity import InternalIdentity
from llmesh.runtime.sqlite import Database, transaction
from llmesh.services.trainer import datasets, registry
from llmesh.services.trainer.store import TERMINAL, add_event, job_row

FORMATS = {
    pb.DATASET_FORMAT_ALPACA_JSON: "alpaca_json",
    pb.DATASET_FORMAT_ALPACA_JSONL: "alpaca_jsonl",
    pb.DATASET_FORMAT_CHAT_JSONL: "chat_jsonl",
    pb.DATASET_FORMAT_CSV_QA: "csv_qa",
    pb.DATASET_FORMAT_TSV_QA: "tsv_qa",
    pb.DATASET_FORMAT_TSV_TRANSLATION: "tsv_translation",
}
FORMAT_PB = {v: k for k, v in FORMATS.items()}
STATES = {
    "queued": pb.JOB_STATE_QUEUED,
    "running": pb.JOB_STATE_RUNNING,
    "succeeded": pb.JOB_STATE_SUCCEEDED,
    "failed": pb.JOB_STATE_FAILED,
    "cancelled": pb.JOB_STATE_CANCELLED,
}
WATCH_POLL_S = 0.25
DRAIN_FACTOR = 4


def ts(t: float | None) -> timestamp_pb2.Timestamp | None:
    if t is None:
        return None
    out = timestamp_pb2.Timestamp()
    out.FromNanoseconds(int(t * 1e9))
    return out


def evaluation_pb(raw: str | None) -> pb.Evaluation | None:
    if not raw:
        return None
    d = json.loads(raw)
    return pb.Evaluation(
        loss=d["loss"],
        perplexity=d["perplexity"],
        rouge_l=d["rouge_l"],
        exact_match=d["exact_match"],
        examples=d["examples"],
    )


def job_pb(row: sqlite3.Row) -> pb.Job:
    progress = json.loads(row["progress"] or "{}")
    return pb.Job(
        job_id=row["job_id"],
        state=STATES[row["state"]],
        dataset_id=row["dataset_id"],
        adapter_name=row["adapter_name"],
        adapter=row["adapter_ref"],
        progress=pb.Progress(**progress),
        base=evaluation_pb(row["base_eval"]),
        tuned=evaluation_pb(row["tuned_eval"]),
        error=row["error"],
        attempts=row["attempts"],
        created_at=ts(row["created_at"]),
        finished_at=ts(row["finished_at"]),
        created_by=row["created_by"],
    )


def adapter_pb(conn: sqlite3.Connection, row: sqlite3.Row) -> pb.Adapter:
    return pb.Adapter(
        name=row["name"],
        version=row["version"],
        ref=folder(row["name"], row["version"]),
        aliases=registry.aliases_of(conn, row["name"], row["version"]),
        job_id=row["job_id"],
        base_model=row["base_model"],
        base_model_sha256=row["base_model_sha256"],
        dataset_id=row["dataset_id"],
        hyperparameters=json.loads(row["hyperparameters"]),
        base=evaluation_pb(row["base_eval"]),
        tuned=evaluation_pb(row["tuned_eval"]),
        created_by=row["created_by"],
        created_at=ts(row["created_at"]),
    )


def dataset_pb(row: sqlite3.Row) -> pb.Dataset:
    return pb.Dataset(
        dataset_id=row["dataset_id"],
        name=row["name"],
        format=FORMAT_PB.get(row["format"], 0),
        train_examples=row["train_examples"],
        eval_examples=row["eval_examples"],
        duplicates_dropped=row["duplicates"],
        sha256=row["sha256"],
        created_at=ts(row["created_at"]),
    )


def resolve_job_params(req: pb.CreateJobRequest) -> dict:
    """The hyperparameters a job runs with, defaults filled in and ranges checked."""
    if req.qlora and not qlora_possible():
        raise FailedPrecondition("QLoRA needs a CUDA GPU and bitsandbytes; neither is available on this trainer")
    lora = req.lora
    p = {
        "adapter_name": registry.check_name(req.adapter_name),
        "rank": lora.rank or 8,
        "alpha": lora.alpha or 2.0 * (lora.rank or 8),
        "dropout": lora.dropout,
        "target_modules": list(lora.target_modules),
        "epochs": req.epochs or 3,
        "max_steps": req.max_steps,
        "learning_rate": req.learning_rate or 2e-4,
        "batch_size": req.batch_size or 8,
        "max_length": req.max_length or 512,
        "seed": req.seed,
        "response_only_loss": req.response_only_loss if req.HasField("response_only_loss") else True,
        "qlora": req.qlora,
        "min_improvement": req.min_improvement,
    }
    checks = [
        ("lora.rank", 1 <= p["rank"] <= 256),
        ("lora.dropout", 0 <= p["dropout"] < 1),
        ("epochs", 1 <= p["epochs"] <= 1000),
        ("learning_rate", 0 < p["learning_rate"] <= 1),
        ("batch_size", 1 <= p["batch_size"] <= 1024),
        ("max_length", 16 <= p["max_length"] <= 32768),
        ("lora.alpha", 0 < p["alpha"] <= 4096),
        ("min_improvement", -1 <= p["min_improvement"] <= 1),
    ]
    for field, ok in checks:
        if not ok:
            raise InvalidArgument(field, "out of range")
    return p


@functools.cache
def qlora_possible() -> bool:
    """Asked only when a job wants QLoRA: importing torch costs the service seconds and
    hundreds of MB it otherwise never needs (training happens in the worker)."""
    try:
        import importlib.util

        import torch

        return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None
    except Exception:  # torch missing or broken: no GPU path either way
        return False


class TrainerServicer(pb_grpc.TrainerServicer):
    def __init__(self, cfg: MeshConfig, db: Database, identity: InternalIdentity, wake: asyncio.Event) -> None:
        self.cfg = cfg
        self.db = db
        self.identity = identity
        self._wake = wake  # the job runner's

    def _caller(self, context: grpc.aio.ServicerContext) -> str:
        p = self.identity.principal(context)
        return f"{p.tenant}/{p.subject}"

    # ---- datasets ---------------------------------------------------------------------
    async def _store_dataset(self, header: pb.DatasetHeader, data: bytes, created_by: str) -> pb.Dataset:
        if not header.name.strip():
            raise InvalidArgument("header.name", "must not be empty")
        if not data.strip():
            raise InvalidArgument("data", "empty dataset: no content received")
        digest = hashlib.sha256(data).hexdigest()
        if header.sha256 and header.sha256.lower() != digest:
            raise InvalidArgument("header.sha256", f"does not match the data received ({digest})")
        fmt = FORMATS.get(header.format) or datasets.detect_format(header.name, data[:4096])
        parsed = await asyncio.to_thread(datasets.parse, data, fmt)
        datasets.validate(parsed)
        fraction = header.eval_fraction or 0.1
        train, evals = datasets.split(parsed.examples, fraction, header.seed)
        dataset_id = datasets.content_hash(parsed.examples)[:24]
        folder = self.cfg.trainer_dir / "datasets" / dataset_id
        if not folder.is_dir():  # written completely, then renamed into place
            tmp = folder.with_name(f".{dataset_id}.{uuid.uuid4().hex}")
            tmp.mkdir(parents=True)
            (tmp / "train.jsonl").write_bytes(datasets.to_jsonl(train))
            (tmp / "eval.jsonl").write_bytes(datasets.to_jsonl(evals))
            try:
                os.rename(tmp, folder)
            except OSError:  # the same content arrived concurrently
                pass

        def record(conn: sqlite3.Connection) -> sqlite3.Row:
            with transaction(conn):
                conn.execute(
                    "INSERT OR IGNORE INTO datasets(dataset_id, name, format, train_examples, eval_examples, duplicates, "
                    "sha256, created_by, created_at) VALUES (?,?,?,?,?,?,?,?,?)",
                    (
                        dataset_id,
                        header.name,
                        fmt,
                        len(train),
                        len(evals),
                        parsed.duplicates,
                        digest,
                        created_by,
                        time.time(),
                    ),
                )
            return conn.execute("SELECT * FROM datasets WHERE dataset_id = ?", (dataset_id,)).fetchone()

        return dataset_pb(await self.db.call(record))

    async def UploadDataset(
        self, request_iterator: AsyncIterator[pb.UploadDatasetRequest], context: grpc.aio.ServicerContext
    ) -> pb.Dataset:
        header: pb.DatasetHeader | None = None
        chunks: list[bytes] = []
        size, limit = 0, self.cfg.trainer.max_dataset_bytes
        too_big = InvalidArgument("data", f"the dataset is larger than the limit of {limit} bytes")
        async for part in request_iterator:
            if part.HasField("header"):
                if header is not None or chunks:
                    raise InvalidArgument("header", "must come once, before the data")
                header = part.header
            else:
                if header is None:
                    raise InvalidArgument("header", "the first message must be the header")
                size += len(part.data)
                if size > DRAIN_FACTOR * limit:
                    raise too_big
                if size <= limit:
                    chunks.append(part.data)
                # Over the limit: nothing more is kept, but the stream is read to its end
                # (up to DRAIN_FACTOR x the limit) — gRPC clients that are still sending
                # when the server answers report INTERNAL instead of this status.
        if header is None:
            raise InvalidArgument("header", "missing")
        if size > limit:
            raise too_big
        return await self._store_dataset(header, b"".join(chunks), self._caller(context))

    async def ImportDataset(self, request: pb.ImportDatasetRequest, context: grpc.aio.ServicerContext) -> pb.Dataset:
        if not request.path:
            raise InvalidArgument("path", "must not be empty")
        path = datasets.resolve_within(self.cfg.dataset_root, request.path)
        if path.stat().st_size > self.cfg.trainer.max_dataset_bytes:
            raise InvalidArgument(
                "path", f"the file is larger than the limit of {self.cfg.trainer.max_dataset_bytes} bytes"
            )
        header = pb.DatasetHeader()
        header.CopyFrom(request.header)
        header.name = header.name or Path(request.path).name
        data = await asyncio.to_thread(path.read_bytes)
        return await self._store_dataset(header, data, self._caller(context))

    async def GetDataset(self, request: pb.GetDatasetRequest, context: grpc.aio.ServicerContext) -> pb.Dataset:
        row = await self.db.call(
            lambda c: c.execute("SELECT * FROM datasets WHERE dataset_id = ?", (request.dataset_id,)).fetchone()
        )
        if row is None:
            raise NotFound("dataset", request.dataset_id)
        return dataset_pb(row)

    # ---- jobs -------------------------------------------------------------------------
    async def CreateJob(self, request: pb.CreateJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        params = resolve_job_params(request)
        job_id = "job_" + uuid.uuid4().hex[:16]
        who = self._caller(context)

        def create(conn: sqlite3.Connection) -> sqlite3.Row:
            with transaction(conn):
                if (
                    conn.execute("SELECT 1 FROM datasets WHERE dataset_id = ?", (request.dataset_id,)).fetchone()
                    is None
                ):
                    raise NotFound("dataset", request.dataset_id)
                conn.execute(
                    "INSERT INTO jobs(job_id, state, dataset_id, adapter_name, params, created_by, created_at) "
                    "VALUES (?, 'queued', ?, ?, ?, ?, ?)",
                    (job_id, request.dataset_id, params["adapter_name"], json.dumps(params), who, time.time()),
                )
                add_event(conn, job_id, "queued", "")
            return job_row(conn, job_id)

        row = await self.db.call(create)
        self._wake.set()
        return job_pb(row)

    async def _job(self, job_id: str) -> sqlite3.Row:
        row = await self.db.call(lambda c: job_row(c, job_id))
        if row is None:
            raise NotFound("job", job_id)
        return row

    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        return job_pb(await self._job(request.job_id))

    async def ListJobs(self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext) -> pb.ListJobsResponse:
        size = min(request.page_size or 50, 500)
        rows = await self.db.call(
            lambda c: list(c.execute("SELECT * FROM jobs ORDER BY created_at DESC LIMIT ?", (size,)))
        )
        return pb.ListJobsResponse(jobs=[job_pb(r) for r in rows])

    async def CancelJob(self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        def cancel(conn: sqlite3.Connection) -> sqlite3.Row | None:
            with transaction(conn):
                row = job_row(conn, request.job_id)
                if row is None or row["state"] in TERMINAL:
                    return row
                if row["state"] == "queued":
                    conn.execute(
                        "UPDATE jobs SET state = 'cancelled', cancel_requested = 1, finished_at = ? WHERE job_id = ?",
                        (time.time(), request.job_id),
                    )
                    add_event(conn, request.job_id, "cancelled", "cancelled before it started")
                else:  # the worker stops at its next step
                    conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE job_id = ?", (request.job_id,))
            return job_row(conn, request.job_id)

        row = await self.db.call(cancel)
        if row is None:
            raise NotFound("job", request.job_id)
        return job_pb(row)

    async def WatchJob(
        self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.JobEvent]:
        row = await self._job(request.job_id)
        yield pb.JobEvent(job=job_pb(row), kind="state", message=row["state"])
        last = 0
        while True:
            events, row = await self.db.call(
                lambda c: (
                    list(
                        c.execute(
                            "SELECT * FROM events WHERE job_id = ? AND id > ? ORDER BY id", (request.job_id, last)
                        )
                    ),
                    job_row(c, request.job_id),
                )
            )
            for e in events:
                last = e["id"]
                yield pb.JobEvent(job=job_pb(row), kind=e["kind"], message=e["message"])
            if row["state"] in TERMINAL and not events:
                return
            await asyncio.sleep(WATCH_POLL_S)

    # ---- adapters ---------------------------------------------------------------------
    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAdaptersResponse:
        return await self.db.call(
            lambda c: pb.ListAdaptersResponse(adapters=[adapter_pb(c, r) for r in registry.rows(c, request.name)])
        )

    async def GetAdapter(self, request: pb.GetAdapterRequest, context: grpc.aio.ServicerContext) -> pb.Adapter:
        return await self.db.call(lambda c: adapter_pb(c, registry.resolve(c, request.ref)))

    async def PromoteAdapter(self, request: pb.PromoteAdapterRequest, context: grpc.aio.ServicerContext) -> pb.Adapter:
        served = await asyncio.to_thread(registry.model_fingerprint, self.cfg.llm_path)

        def promote(c: sqlite3.Connection) -> pb.Adapter:
            name, version = registry.promote(c, self.cfg.adapter_dir, request.ref, request.alias, served)
            return adapter_pb(c, registry.resolve(c, folder(name, version)))

        return await self.db.call(promote)

    async def RollbackAdapter(
        self, request: pb.RollbackAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.Adapter:
        def rollback(c: sqlite3.Connection) -> pb.Adapter:
            name, version = registry.rollback(c, self.cfg.adapter_dir, request.name, request.alias)
            return adapter_pb(c, registry.resolve(c, folder(name, version)))

        return await self.db.call(rollback)

    async def SetSplit(self, request: pb.SetSplitRequest, context: grpc.aio.ServicerContext) -> pb.Split:
        served = await asyncio.to_thread(registry.model_fingerprint, self.cfg.llm_path)
        arms = [(a.version, a.weight) for a in request.arms]
        await self.db.call(
            lambda c: registry.set_split(c, self.cfg.adapter_dir, request.name, request.alias, arms, served)
        )
        return pb.Split(name=request.name, alias=request.alias or DEFAULT_ALIAS, arms=request.arms)

    async def DeleteAdapter(
        self, request: pb.DeleteAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteAdapterResponse:
        deleted = await self.db.call(lambda c: registry.delete(c, self.cfg.adapter_dir, request.ref))
        return pb.DeleteAdapterResponse(deleted=deleted)
