"""``llmesh train`` and ``llmesh adapters``: the trainer service from an operator's
shell on the mesh's host (loopback, vouched for with the host's internal identity)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import grpc
import typer

from llmesh.cli_common import ConfigOpt, _config, _fail, console
from llmesh.config import MeshConfig
from llmesh.runtime import files

adapters_app = typer.Typer(
    help="The adapter registry: versions, aliases, lineage and evaluation.", no_args_is_help=True
)
CHUNK = 1 << 20


def _stub(cfg: MeshConfig):  # type: ignore[no-untyped-def]
    from llmesh.client import local_channel
    from llmesh.pb.trainer.v1 import trainer_pb2_grpc

    s = cfg.trainer.server
    return trainer_pb2_grpc.TrainerStub(local_channel(files.address(s.host, s.port), cfg.home))


def upload(stub, data: bytes, name: str, eval_fraction: float = 0.1, seed: int = 0) -> object:  # type: ignore[no-untyped-def]
    """Stream a dataset to the trainer (header with its SHA-256, then 1 MiB chunks)."""
    from llmesh.pb.trainer.v1 import trainer_pb2 as pb

    header = pb.DatasetHeader(
        name=name, sha256=hashlib.sha256(data).hexdigest(), eval_fraction=eval_fraction, seed=seed
    )

    def parts() -> Iterator[pb.UploadDatasetRequest]:
        yield pb.UploadDatasetRequest(header=header)
        for i in range(0, len(data), CHUNK):
            yield pb.UploadDatasetRequest(data=data[i : i + CHUNK])

    return stub.UploadDataset(parts(), timeout=120)


def watch(stub, job_id: str) -> object:  # type: ignore[no-untyped-def]
    """Follow a job with a progress bar; returns the final job."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from llmesh.pb.trainer.v1 import trainer_pb2 as pb

    job = None
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
        console=console,
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


def train(
    dataset: Annotated[
        Path, typer.Argument(help="Dataset file: alpaca JSON/JSONL, chat/sharegpt JSONL, CSV or TSV pairs.")
    ],
    name: Annotated[str, typer.Option(help="Adapter name in the registry (the version is assigned).")],
    epochs: Annotated[int, typer.Option()] = 3,
    learning_rate: Annotated[float, typer.Option("--lr")] = 2e-4,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    batch_size: Annotated[int, typer.Option()] = 8,
    max_steps: Annotated[int, typer.Option(help="Stop after this many steps (0: epochs decide).")] = 0,
    eval_fraction: Annotated[float, typer.Option(help="Held out for evaluation.")] = 0.1,
    min_improvement: Annotated[float, typer.Option(help="ROUGE-L gain over the base required to promote.")] = 0.0,
    seed: Annotated[int, typer.Option()] = 0,
    watch_job: Annotated[bool, typer.Option("--watch", help="Follow the job with a progress bar.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Upload DATASET and start a LoRA job producing NAME@vN."""
    from llmesh.pb.trainer.v1 import trainer_pb2 as pb

    cfg = _config(config)
    stub = _stub(cfg)
    try:
        ds = upload(stub, dataset.read_bytes(), dataset.name, eval_fraction, seed)
        console.print(
            f"dataset {ds.dataset_id}: {ds.train_examples} train + {ds.eval_examples} eval examples "
            f"({ds.duplicates_dropped} duplicates dropped)"
        )
        job = stub.CreateJob(
            pb.CreateJobRequest(
                dataset_id=ds.dataset_id,
                adapter_name=name,
                lora=pb.LoraConfig(rank=rank),
                epochs=epochs,
                max_steps=max_steps,
                learning_rate=learning_rate,
                batch_size=batch_size,
                seed=seed,
                min_improvement=min_improvement,
            ),
            timeout=30,
        )
        print(f"job_id={job.job_id}")
        if watch_job:
            job = watch(stub, job.job_id)
            _print_job(job)
            if job.state != pb.JOB_STATE_SUCCEEDED:
                raise typer.Exit(1)
    except grpc.RpcError as e:
        _fail(e)


def _print_job(job) -> None:  # type: ignore[no-untyped-def]
    from llmesh.pb.trainer.v1 import trainer_pb2 as pb

    console.print(
        f"job {job.job_id}: {pb.JobState.Name(job.state).removeprefix('JOB_STATE_').lower()} "
        f"{job.adapter or ''} {job.error or ''}"
    )
    if job.HasField("tuned"):
        console.print(
            f"  base    ROUGE-L {job.base.rouge_l:.3f}  exact {job.base.exact_match:.3f}  loss {job.base.loss:.3f}"
        )
        console.print(
            f"  adapter ROUGE-L {job.tuned.rouge_l:.3f}  exact {job.tuned.exact_match:.3f}  loss {job.tuned.loss:.3f}"
        )


@adapters_app.command("list")
def adapters_list(
    name: Annotated[str, typer.Argument(help="Only this adapter's versions.")] = "", config: ConfigOpt = None
) -> None:
    """Every adapter version with its aliases and evaluation."""
    from rich.table import Table

    from llmesh.pb.trainer.v1 import trainer_pb2 as pb

    try:
        r = _stub(_config(config)).ListAdapters(pb.ListAdaptersRequest(name=name), timeout=10)
    except grpc.RpcError as e:
        _fail(e)
    table = Table("adapter", "aliases", "ROUGE-L base → adapter", "exact match", "dataset", "created by")
    for a in r.adapters:
        table.add_row(
            a.ref,
            ", ".join(a.aliases),
            f"{a.base.rouge_l:.3f} → {a.tuned.rouge_l:.3f}",
            f"{a.tuned.exact_match:.3f}",
            a.dataset_id,
            a.created_by,
        )
    console.print(table)


@adapters_app.command("show")
def adapters_show(
    ref: Annotated[str, typer.Argument(help="name, name@vN or name@alias")], config: ConfigOpt = None
) -> None:
    """One adapter's lineage and evaluation (JSON)."""
    from google.protobuf.json_format import MessageToJson

    from llmesh.pb.trainer.v1 import trainer_pb2 as pb

    try:
        print(MessageToJson(_stub(_config(config)).GetAdapter(pb.GetAdapterRequest(ref=ref), timeout=10)))
    except grpc.RpcError as e:
        _fail(e)


@adapters_app.command("promote")
def adapters_promote(
    ref: Annotated[str, typer.Argument(help="name@vN")],
    alias: Annotated[str, typer.Option(help="Alias to point at it.")] = "live",
    config: ConfigOpt = None,
) -> None:
    """Point an alias (default live) at a version: generation with NAME uses it."""
    from llmesh.pb.trainer.v1 import trainer_pb2 as pb

    try:
        a = _stub(_config(config)).PromoteAdapter(pb.PromoteAdapterRequest(ref=ref, alias=alias), timeout=30)
    except grpc.RpcError as e:
        _fail(e)
    print(f"{a.name}@{alias} -> {a.ref}")


@adapters_app.command("rollback")
def adapters_rollback(name: str, alias: Annotated[str, typer.Option()] = "live", config: ConfigOpt = None) -> None:
    """Point the alias back at the version before the last promote."""
    from llmesh.pb.trainer.v1 import trainer_pb2 as pb

    try:
        a = _stub(_config(config)).RollbackAdapter(pb.RollbackAdapterRequest(name=name, alias=alias), timeout=30)
    except grpc.RpcError as e:
        _fail(e)
    print(f"{a.name}@{alias} -> {a.ref}")


@adapters_app.command("delete")
def adapters_delete(ref: Annotated[str, typer.Argument(help="name@vN")], config: ConfigOpt = None) -> None:
    """Delete a version (refused while an alias points at it)."""
    from llmesh.pb.trainer.v1 import trainer_pb2 as pb

    try:
        r = _stub(_config(config)).DeleteAdapter(pb.DeleteAdapterRequest(ref=ref), timeout=30)
    except grpc.RpcError as e:
        _fail(e)
    print("deleted" if r.deleted else "not found")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.add_typer(adapters_app, name="adapters")


@adapters_app.command("export")
def adapters_export(
    ref: Annotated[str, typer.Argument(help="name, name@vN or name@alias")],
    dest: Annotated[Path, typer.Argument(help="New folder for the merged model.")],
    config: ConfigOpt = None,
) -> None:
    """Merge an adapter into its base model and save a standalone model folder."""
    from llmesh.pb.trainer.v1 import trainer_pb2 as pb
    from llmesh.services.trainer.export import merge

    cfg = _config(config)
    try:
        a = _stub(cfg).GetAdapter(pb.GetAdapterRequest(ref=ref), timeout=10)
    except grpc.RpcError as e:
        _fail(e)
    try:
        out = merge(Path(a.base_model), cfg.adapter_dir / a.ref, dest)
    except FileExistsError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from e
    print(f"{a.ref} merged into {a.base_model} -> {out}")


@adapters_app.command("split")
def adapters_split(
    name: str,
    arms: Annotated[
        list[str], typer.Argument(help="VERSION=WEIGHT pairs, e.g. 1=90 2=10; none removes the split.")
    ] = [],
    alias: Annotated[str, typer.Option(help="The alias the split applies to.")] = "live",
    config: ConfigOpt = None,
) -> None:
    """A/B split: route NAME@ALIAS between versions by weight, sticky per caller."""
    from llmesh.pb.trainer.v1 import trainer_pb2 as pb

    parsed = []
    for arm in arms:
        version, _, weight = arm.partition("=")
        try:
            parsed.append(pb.SplitArm(version=int(version.lstrip("v")), weight=float(weight)))
        except ValueError:
            console.print(f"[red]bad arm {arm!r}: expected VERSION=WEIGHT[/red]")
            raise typer.Exit(2) from None
    try:
        _stub(_config(config)).SetSplit(pb.SetSplitRequest(name=name, alias=alias, arms=parsed), timeout=30)
    except grpc.RpcError as e:
        _fail(e)
    print(f"{name}@{alias}: " + (", ".join(f"v{a.version}={a.weight:g}" for a in parsed) or "no split"))
