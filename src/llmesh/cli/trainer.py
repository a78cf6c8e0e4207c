"""Client commands of the trainer API: ``llmesh train`` and ``llmesh adapters``. Through
the gateway when an API key is configured, else straight to this host's trainer service;
``adapters export`` reads the adapter's files, so it runs on the mesh's host."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from llmesh.cli.common import (
    Access,
    ApiKeyFileOpt,
    ConfigOpt,
    GatewayOpt,
    LocalOpt,
    channel_for,
    console,
    fail,
    mesh_config,
)
from llmesh.config import MeshConfig

if TYPE_CHECKING:  # the generated modules load when a command runs: --help stays fast
    from llmesh.pb.trainer.v1 import trainer_pb2 as pb
    from llmesh.pb.trainer.v1 import trainer_pb2_grpc as pb_grpc

adapters_app = typer.Typer(
    help="The adapter registry: versions, aliases, lineage and evaluation.", no_args_is_help=True
)
jobs_app = typer.Typer(help="Training jobs: what each chose, its progress and evaluation.", no_args_is_help=True)
MODES = ("auto", "memorise", "generalise")


def stub(cfg: MeshConfig, access: Access) -> pb_grpc.TrainerStub:
    from llmesh.pb.trainer.v1 import trainer_pb2_grpc as pb_grpc

    return pb_grpc.TrainerStub(channel_for(cfg, cfg.trainer.server, access))


def client(config: Path | None, gateway: str | None, api_key_file: Path | None, local: bool) -> pb_grpc.TrainerStub:
    return stub(mesh_config(config), Access(gateway, api_key_file, local))


def train(
    dataset: Annotated[
        Path, typer.Argument(help="Dataset file: alpaca JSON/JSONL, chat/sharegpt JSONL, CSV or TSV pairs.")
    ],
    name: Annotated[str, typer.Option(help="Adapter name in the registry (the version is assigned).")],
    mode: Annotated[
        str, typer.Option(help="memorise (learn the answers), generalise (held-out early stopping) or auto.")
    ] = "auto",
    epochs: Annotated[int, typer.Option(help="0: chosen for the data.")] = 0,
    learning_rate: Annotated[float, typer.Option("--lr", help="0: chosen for the data.")] = 0.0,
    rank: Annotated[int, typer.Option(help="LoRA rank (0: chosen for the data).")] = 0,
    batch_size: Annotated[int, typer.Option(help="0: chosen for the data.")] = 0,
    max_steps: Annotated[int, typer.Option(help="Stop after this many steps (0: no limit).")] = 0,
    eval_fraction: Annotated[float, typer.Option(help="Held out for evaluation.")] = 0.1,
    min_improvement: Annotated[float, typer.Option(help="ROUGE-L gain over the base required to promote.")] = 0.0,
    seed: Annotated[int, typer.Option()] = 0,
    watch_job: Annotated[bool, typer.Option("--watch", help="Follow the job with a progress bar.")] = False,
    gateway: GatewayOpt = None,
    api_key_file: ApiKeyFileOpt = None,
    local: LocalOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Upload DATASET and start a LoRA job producing NAME@vN.

    Options left at 0 are chosen for the data: fewer than 50 rows are memorised (every row
    trained on, pass = 90% of the answers reproduced exactly), larger sets generalise (10%
    held out, early stopping). The job says what it chose and why."""
    from llmesh.client.trainer import upload, watch
    from llmesh.pb.trainer.v1 import trainer_pb2 as pb

    if mode not in MODES:
        fail(f"--mode must be one of {', '.join(MODES)}", 2)
    if not dataset.is_file():
        fail(f"file not found: {dataset}" if not dataset.exists() else f"not a file: {dataset}", 2)
    trainer = client(config, gateway, api_key_file, local)
    ds = upload(trainer, dataset.read_bytes(), dataset.name, eval_fraction, seed)
    console.print(
        f"dataset {ds.dataset_id}: {ds.train_examples} train + {ds.eval_examples} eval examples "
        f"({ds.duplicates_dropped} duplicates dropped)"
    )
    job = trainer.CreateJob(
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
            mode=pb.TrainingMode.Value(
                f"TRAINING_MODE_{mode.upper()}" if mode != "auto" else "TRAINING_MODE_UNSPECIFIED"
            ),
        ),
        timeout=30,
    )
    print(f"job_id={job.job_id}")
    print_plan(job)
    if watch_job:
        job = watch(trainer, job.job_id, console)
        print_job(job)
        if job.state != pb.JOB_STATE_SUCCEEDED:
            raise typer.Exit(1)


def print_plan(job: pb.Job) -> None:
    """What the job chose for the data, and why (one line of values, one of reasons)."""
    from llmesh.pb.trainer.v1 import trainer_pb2 as pb

    if not job.HasField("plan"):
        return
    p = job.plan
    split = f"{p.held_out_examples} held out" if p.held_out_examples else "no held-out split"
    stopping = f", early stopping after {p.patience} evaluations" if p.patience else ""
    fmt = f", {p.prompt_format} prompts" if p.prompt_format else ""
    console.print(
        f"plan: {pb.TrainingMode.Name(p.mode).removeprefix('TRAINING_MODE_').lower()}: {p.steps} steps "
        f"({p.epochs} epochs) over {p.train_examples} rows, {split}{stopping}; lr {p.learning_rate:g}, "
        f"LoRA r={p.rank}, batch {p.batch_size}{fmt}",
        markup=False,
    )
    console.print(f"  why: {p.reason}", markup=False)


def print_job(job: pb.Job) -> None:
    from llmesh.pb.trainer.v1 import trainer_pb2 as pb

    console.print(
        f"job {job.job_id}: {pb.JobState.Name(job.state).removeprefix('JOB_STATE_').lower()} "
        f"{job.adapter or ''} {job.error or ''}"
    )
    if job.HasField("tuned"):
        on = {"train": "training answers", "held_out": "held-out rows"}.get(job.tuned.split, "eval rows")
        console.print(f"  evaluated on {job.tuned.examples} {on}")
        console.print(
            f"  base    ROUGE-L {job.base.rouge_l:.3f}  exact {job.base.exact_match:.3f}  loss {job.base.loss:.3f}"
        )
        console.print(
            f"  adapter ROUGE-L {job.tuned.rouge_l:.3f}  exact {job.tuned.exact_match:.3f}  loss {job.tuned.loss:.3f}"
        )
        if job.plan.pass_exact_match:
            n = job.tuned.examples
            console.print(
                f"  reproduced {round(job.tuned.exact_match * n)}/{n} answers exactly: "
                f"{'pass' if job.passed else 'FAIL'} (needs {job.plan.pass_exact_match:.0%})"
            )
        if job.best_step:
            console.print(f"  kept the adapter of step {job.best_step} (best held-out loss)")


@jobs_app.command("show")
def jobs_show(
    job_id: str,
    gateway: GatewayOpt = None,
    api_key_file: ApiKeyFileOpt = None,
    local: LocalOpt = False,
    config: ConfigOpt = None,
) -> None:
    """One job: its plan (what it chose and why), progress and evaluation."""
    from llmesh.pb.trainer.v1 import trainer_pb2 as pb

    job = client(config, gateway, api_key_file, local).GetJob(pb.GetJobRequest(job_id=job_id), timeout=10)
    print_plan(job)
    if job.progress.total_steps:
        console.print(f"  step {job.progress.step}/{job.progress.total_steps}  loss {job.progress.loss:.4f}")
    print_job(job)


@jobs_app.command("list")
def jobs_list(
    gateway: GatewayOpt = None,
    api_key_file: ApiKeyFileOpt = None,
    local: LocalOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Recent jobs, newest first."""
    from rich.table import Column, Table

    from llmesh.pb.trainer.v1 import trainer_pb2 as pb

    r = client(config, gateway, api_key_file, local).ListJobs(pb.ListJobsRequest(), timeout=10)
    # The job id is what `jobs show` takes: never wrapped, so it can be copied whole.
    job = Column("job", no_wrap=True, min_width=max((len(j.job_id) for j in r.jobs), default=3))
    table = Table(job, "state", "adapter", "mode", "steps", "exact match")
    for j in r.jobs:
        table.add_row(
            j.job_id,
            pb.JobState.Name(j.state).removeprefix("JOB_STATE_").lower(),
            j.adapter or j.adapter_name,
            pb.TrainingMode.Name(j.plan.mode).removeprefix("TRAINING_MODE_").lower() if j.HasField("plan") else "",
            f"{j.progress.step}/{j.progress.total_steps}",
            f"{j.tuned.exact_match:.3f}" if j.HasField("tuned") else "",
        )
    console.print(table)


@adapters_app.command("list")
def adapters_list(
    name: Annotated[str, typer.Argument(help="Only this adapter's versions.")] = "",
    gateway: GatewayOpt = None,
    api_key_file: ApiKeyFileOpt = None,
    local: LocalOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Every adapter version with its aliases and evaluation."""
    from rich.table import Column, Table

    from llmesh.pb.trainer.v1 import trainer_pb2 as pb

    r = client(config, gateway, api_key_file, local).ListAdapters(pb.ListAdaptersRequest(name=name), timeout=10)
    # The ref is what the other commands take: never wrapped, so it can be copied whole.
    adapter = Column("adapter", no_wrap=True, min_width=max((len(a.ref) for a in r.adapters), default=7))
    table = Table(adapter, "aliases", "ROUGE-L base → adapter", "exact match", "dataset", "created by")
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
    ref: Annotated[str, typer.Argument(help="name, name@vN or name@alias")],
    gateway: GatewayOpt = None,
    api_key_file: ApiKeyFileOpt = None,
    local: LocalOpt = False,
    config: ConfigOpt = None,
) -> None:
    """One adapter's lineage and evaluation (JSON)."""
    from google.protobuf.json_format import MessageToJson

    from llmesh.pb.trainer.v1 import trainer_pb2 as pb

    adapter = client(config, gateway, api_key_file, local).GetAdapter(pb.GetAdapterRequest(ref=ref), timeout=10)
    print(MessageToJson(adapter))


@adapters_app.command("promote")
def adapters_promote(
    ref: Annotated[str, typer.Argument(help="name@vN")],
    alias: Annotated[str, typer.Option(help="Alias to point at it.")] = "live",
    gateway: GatewayOpt = None,
    api_key_file: ApiKeyFileOpt = None,
    local: LocalOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Point an alias (default live) at a version: generation with NAME uses it."""
    from llmesh.pb.trainer.v1 import trainer_pb2 as pb

    request = pb.PromoteAdapterRequest(ref=ref, alias=alias)
    a = client(config, gateway, api_key_file, local).PromoteAdapter(request, timeout=30)
    print(f"{a.name}@{alias} -> {a.ref}")


@adapters_app.command("rollback")
def adapters_rollback(
    name: str,
    alias: Annotated[str, typer.Option()] = "live",
    gateway: GatewayOpt = None,
    api_key_file: ApiKeyFileOpt = None,
    local: LocalOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Point the alias back at the version before the last promote."""
    from llmesh.pb.trainer.v1 import trainer_pb2 as pb

    request = pb.RollbackAdapterRequest(name=name, alias=alias)
    a = client(config, gateway, api_key_file, local).RollbackAdapter(request, timeout=30)
    print(f"{a.name}@{alias} -> {a.ref}")


@adapters_app.command("delete")
def adapters_delete(
    ref: Annotated[str, typer.Argument(help="name@vN")],
    gateway: GatewayOpt = None,
    api_key_file: ApiKeyFileOpt = None,
    local: LocalOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Delete a version (refused while an alias points at it)."""
    from llmesh.pb.trainer.v1 import trainer_pb2 as pb

    r = client(config, gateway, api_key_file, local).DeleteAdapter(pb.DeleteAdapterRequest(ref=ref), timeout=30)
    print("deleted" if r.deleted else "not found")


@adapters_app.command("export")
def adapters_export(
    ref: Annotated[str, typer.Argument(help="name, name@vN or name@alias")],
    dest: Annotated[Path, typer.Argument(help="New folder for the merged model.")],
    config: ConfigOpt = None,
) -> None:
    """Merge an adapter into its base model and save a standalone model folder.

    Runs on the mesh's host: it reads the adapter's files."""
    from llmesh.pb.trainer.v1 import trainer_pb2 as pb
    from llmesh.services.trainer.export import merge

    cfg = mesh_config(config)
    a = stub(cfg, Access(local=True)).GetAdapter(pb.GetAdapterRequest(ref=ref), timeout=10)
    try:
        out = merge(Path(a.base_model), cfg.adapter_dir / a.ref, dest)
    except FileExistsError:
        fail(f"already exists: {dest} (export into a new folder)", 2)
    print(f"{a.ref} merged into {a.base_model} -> {out}")


@adapters_app.command("split")
def adapters_split(
    name: str,
    arms: Annotated[
        list[str], typer.Argument(help="VERSION=WEIGHT pairs, e.g. 1=90 2=10; none removes the split.")
    ] = [],  # noqa: B006  # typer reads the default, never mutates it
    alias: Annotated[str, typer.Option(help="The alias the split applies to.")] = "live",
    gateway: GatewayOpt = None,
    api_key_file: ApiKeyFileOpt = None,
    local: LocalOpt = False,
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
            fail(f"bad arm {arm!r}: expected VERSION=WEIGHT, e.g. 1=90", 2)
    request = pb.SetSplitRequest(name=name, alias=alias, arms=parsed)
    client(config, gateway, api_key_file, local).SetSplit(request, timeout=30)
    print(f"{name}@{alias}: " + (", ".join(f"v{a.version}={a.weight:g}" for a in parsed) or "no split"))


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.add_typer(adapters_app, name="adapters")
    app.add_typer(jobs_app, name="jobs")
