"""Trainer servicer: protobuf ↔ domain, a few lines per RPC. Datasets go through
``intake``, job rows and events through ``store``, hyperparameters through ``job_params``,
adapters through ``registry``; training itself runs in worker processes started by
``JobRunner``."""

from __future__ import annotations

import asyncio
import functools
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from llmesh.adapter_store import DEFAULT_ALIAS, folder
from llmesh.config import MeshConfig
from llmesh.pb.trainer.v1 import trainer_pb2 as pb
from llmesh.pb.trainer.v1 import trainer_pb2_grpc as pb_grpc
from llmesh.runtime.errors import InvalidArgument, NotFound
from llmesh.runtime.identity import InternalIdentity
from llmesh.runtime.sqlite import Database
from llmesh.services.trainer import datasets, job_params, plan, registry, store
from llmesh.services.trainer.intake import DatasetIntake, DatasetSpec, UploadBuffer, read_import

# The servicer methods' context (request and response types vary per method).
Context = grpc.aio.ServicerContext[Any, Any]
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
MAX_PAGE = 500


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
        split=d.get("split", ""),
    )


def plan_pb(params: dict[str, Any]) -> pb.Plan | None:
    """The job's plan (None for a job queued before plans existed)."""
    if "plan" not in params:
        return None
    p = plan.Plan.from_dict(params["plan"])
    return pb.Plan(
        mode=job_params.MODE_PB[p.mode],
        train_examples=p.train_examples,
        held_out_examples=p.held_out_examples,
        steps=p.steps,
        epochs=p.epochs,
        learning_rate=p.learning_rate,
        rank=p.rank,
        batch_size=p.batch_size,
        eval_every_steps=p.eval_every_steps,
        patience=p.patience,
        pass_exact_match=p.pass_exact_match,
        reason=p.reason,
        prompt_format=params.get("prompt_format", ""),  # known once the worker loaded the tokenizer
    )


def job_pb(row: sqlite3.Row) -> pb.Job:
    progress = json.loads(row["progress"] or "{}")
    params = json.loads(row["params"])
    outcome = json.loads(row["outcome"])  # written by the worker once evaluated
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
        plan=plan_pb(params),
        passed=outcome.get("passed", False),
        best_step=outcome.get("best_step", 0),
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
        prompt_format=row["prompt_format"],
    )


def dataset_pb(row: sqlite3.Row) -> pb.Dataset:
    return pb.Dataset(
        dataset_id=row["dataset_id"],
        name=row["name"],
        format=FORMAT_PB.get(row["format"], pb.DATASET_FORMAT_UNSPECIFIED),
        train_examples=row["train_examples"],
        eval_examples=row["eval_examples"],
        duplicates_dropped=row["duplicates"],
        sha256=row["sha256"],
        created_at=ts(row["created_at"]),
    )


def dataset_spec(header: pb.DatasetHeader) -> DatasetSpec:
    return DatasetSpec(
        name=header.name,
        fmt=FORMATS.get(header.format),
        sha256=header.sha256,
        eval_fraction=header.eval_fraction,
        seed=header.seed,
    )


class TrainerServicer(pb_grpc.TrainerServicer):
    def __init__(self, cfg: MeshConfig, db: Database, identity: InternalIdentity, wake: asyncio.Event) -> None:
        self.cfg = cfg
        self.db = db
        self.identity = identity
        self._wake = wake  # the job runner's
        t = cfg.trainer
        languages = datasets.Languages(t.translation_source_lang, t.translation_target_lang)
        self.intake = DatasetIntake(db, cfg.trainer_dir / "datasets", languages)

    def _caller(self, context: Context) -> str:
        p = self.identity.principal(context)
        return f"{p.tenant}/{p.subject}"

    # ---- datasets ---------------------------------------------------------------------
    async def UploadDataset(
        self, request_iterator: AsyncIterator[pb.UploadDatasetRequest], context: Context
    ) -> pb.Dataset:
        header: pb.DatasetHeader | None = None
        upload = UploadBuffer(self.cfg.trainer.max_dataset_bytes)
        async for part in request_iterator:
            if part.HasField("header"):
                if header is not None or upload.started:
                    raise InvalidArgument("header", "must come once, before the data")
                header = part.header
            elif header is None:
                raise InvalidArgument("header", "the first message must be the header")
            else:
                upload.add(part.data)
        if header is None:
            raise InvalidArgument("header", "missing")
        row = await self.intake.store(dataset_spec(header), upload.data(), self._caller(context))
        return dataset_pb(row)

    async def ImportDataset(self, request: pb.ImportDatasetRequest, context: Context) -> pb.Dataset:
        limit = self.cfg.trainer.max_dataset_bytes
        data = await asyncio.to_thread(read_import, self.cfg.dataset_root, request.path, limit)
        spec = dataset_spec(request.header)
        spec = DatasetSpec(spec.name or Path(request.path).name, spec.fmt, spec.sha256, spec.eval_fraction, spec.seed)
        return dataset_pb(await self.intake.store(spec, data, self._caller(context)))

    async def GetDataset(self, request: pb.GetDatasetRequest, context: Context) -> pb.Dataset:
        row = await self.db.call(lambda c: store.dataset_row(c, request.dataset_id))
        if row is None:
            raise NotFound("dataset", request.dataset_id)
        return dataset_pb(row)

    # ---- jobs -------------------------------------------------------------------------
    async def CreateJob(self, request: pb.CreateJobRequest, context: Context) -> pb.Job:
        job_params.precheck(request)
        ds = await self.db.call(lambda c: store.dataset_row(c, request.dataset_id))
        if ds is None:
            raise NotFound("dataset", request.dataset_id)
        chosen = plan.choose(job_params.requested(request), ds["train_examples"], ds["eval_examples"])
        params = job_params.check(job_params.params_of(request, chosen))
        job_id = "job_" + uuid.uuid4().hex[:16]
        who = self._caller(context)
        row = await self.db.call(lambda c: store.create_job(c, job_id, request.dataset_id, params, who))
        if row is None:
            raise NotFound("dataset", request.dataset_id)
        self._wake.set()
        return job_pb(row)

    async def _job(self, job_id: str) -> sqlite3.Row:
        row = await self.db.call(lambda c: store.job_row(c, job_id))
        if row is None:
            raise NotFound("job", job_id)
        return row

    async def GetJob(self, request: pb.GetJobRequest, context: Context) -> pb.Job:
        return job_pb(await self._job(request.job_id))

    async def ListJobs(self, request: pb.ListJobsRequest, context: Context) -> pb.ListJobsResponse:
        size = min(request.page_size or 50, MAX_PAGE)
        rows = await self.db.call(lambda c: store.recent_jobs(c, size))
        return pb.ListJobsResponse(jobs=[job_pb(r) for r in rows])

    async def CancelJob(self, request: pb.CancelJobRequest, context: Context) -> pb.Job:
        row = await self.db.call(lambda c: store.cancel_job(c, request.job_id))
        if row is None:
            raise NotFound("job", request.job_id)
        return job_pb(row)

    async def WatchJob(self, request: pb.GetJobRequest, context: Context) -> AsyncIterator[pb.JobEvent]:
        row = await self._job(request.job_id)
        yield pb.JobEvent(job=job_pb(row), kind="state", message=row["state"])
        last = 0
        while True:
            poll = functools.partial(store.events_after, job_id=request.job_id, last_id=last)
            events, now = await self.db.call(poll)
            row = now if now is not None else row
            for e in events:
                last = e["id"]
                yield pb.JobEvent(job=job_pb(row), kind=e["kind"], message=e["message"])
            if row["state"] in store.TERMINAL and not events:
                return
            await asyncio.sleep(WATCH_POLL_S)

    # ---- adapters ---------------------------------------------------------------------
    async def ListAdapters(self, request: pb.ListAdaptersRequest, context: Context) -> pb.ListAdaptersResponse:
        return await self.db.call(
            lambda c: pb.ListAdaptersResponse(adapters=[adapter_pb(c, r) for r in registry.rows(c, request.name)])
        )

    async def GetAdapter(self, request: pb.GetAdapterRequest, context: Context) -> pb.Adapter:
        return await self.db.call(lambda c: adapter_pb(c, registry.resolve(c, request.ref)))

    async def PromoteAdapter(self, request: pb.PromoteAdapterRequest, context: Context) -> pb.Adapter:
        served = await asyncio.to_thread(registry.model_fingerprint, self.cfg.llm_path)

        def promote(c: sqlite3.Connection) -> pb.Adapter:
            name, version = registry.promote(c, self.cfg.adapter_dir, request.ref, request.alias, served)
            return adapter_pb(c, registry.resolve(c, folder(name, version)))

        return await self.db.call(promote)

    async def RollbackAdapter(self, request: pb.RollbackAdapterRequest, context: Context) -> pb.Adapter:
        def rollback(c: sqlite3.Connection) -> pb.Adapter:
            name, version = registry.rollback(c, self.cfg.adapter_dir, request.name, request.alias)
            return adapter_pb(c, registry.resolve(c, folder(name, version)))

        return await self.db.call(rollback)

    async def SetSplit(self, request: pb.SetSplitRequest, context: Context) -> pb.Split:
        served = await asyncio.to_thread(registry.model_fingerprint, self.cfg.llm_path)
        arms = [(a.version, a.weight) for a in request.arms]
        await self.db.call(
            lambda c: registry.set_split(c, self.cfg.adapter_dir, request.name, request.alias, arms, served)
        )
        return pb.Split(name=request.name, alias=request.alias or DEFAULT_ALIAS, arms=request.arms)

    async def DeleteAdapter(self, request: pb.DeleteAdapterRequest, context: Context) -> pb.DeleteAdapterResponse:
        deleted = await self.db.call(lambda c: registry.delete(c, self.cfg.adapter_dir, request.ref))
        return pb.DeleteAdapterResponse(deleted=deleted)
