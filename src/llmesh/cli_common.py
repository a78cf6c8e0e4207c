"""What every ``llmesh`` command module shares: consoles, the config option, error exits."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import grpc
import typer
from rich.console import Console

from llmesh.config import ConfigError, MeshConfig, load_config

console = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config (default: LLMESH_CONFIG or the bundled default).")
]


def _config(path: Path | None) -> MeshConfig:
    try:
        return load_config(path)
    except ConfigError as e:
        err.print(f"[red]config error:[/red] {e}")
        raise typer.Exit(2) from e


def _fail(e: grpc.RpcError) -> None:
    from llmesh.client import describe_error

    err.print(f"[red]{describe_error(e)}[/red]")
    raise typer.Exit(1)
