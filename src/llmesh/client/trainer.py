"""Trainer helpers shared by the CLI, the demo and the benchmarks: stream a dataset up,
follow a job to its end. They take a stub, so they work on a local or a gateway channel."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from llmesh.pb.trainer.v1 import trainer_pb2 as pb
from llmesh.pb.trainer.v1 import trainer_pb2_grpc as pb_grpc

CHUNK = 1 << 20


def upload(
    stub: pb_grpc.TrainerStub, data: bytes, name: str, eval_fraction: float = 0.1, seed: int = 0, timeout: float = 120
) -> pb.Dataset:
    """Stream a dataset to the trainer (a header with its SHA-256, then 1 MiB chunks)."""
    header = pb.DatasetHeader(
        name=name, sha256=hashlib.sha256(data).hexdigest(), eval_fraction=eval_fraction, seed=seed
    )

    def parts() -> Iterator[pb.UploadDatasetRequest]:
        yield pb.UploadDatasetRequest(header=header)
        for i in range(0, len(data), CHUNK):
            yield pb.UploadDatasetRequest(data=data[i : i + CHUNK])

    return stub.UploadDataset(parts(), timeout=timeout)


def watch(stub: pb_grpc.TrainerStub, job_id: str, console: Console | None = None) -> pb.Job:
    """Follow a job with a progress bar on ``console`` until it ends; returns the final job."""
    job = pb.Job(job_id=job_id)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
        console=console or Console(),
    ) as bar:
        task = bar.add_task(job_id, total=None, loss="-")
        for event in stub.WatchJob(pb.GetJobRequest(job_id=job_id), timeout=24 * 3600):
            job = event.job
            p = job.progress
            if p.total_steps:
                bar.update(task, total=p.total_steps, completed=p.step, loss=f"{p.loss:.4f}")
            if event.kind not in ("progress", "state"):
                bar.console.print(f"[dim]{event.kind}[/dim] {event.message}")
    return job
