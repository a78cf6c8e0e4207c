"""The ``llmesh`` command, assembled from one module per command group.

Heavy imports (torch for ``models init``, the launcher, generated code) happen inside
commands, so ``llmesh --help`` and client calls start fast."""

from __future__ import annotations

import typer

from llmesh.cli import inference, mesh, security, trainer
from llmesh.cli.common import OneLineErrors

app = typer.Typer(
    help="llmesh: serve, adapt and safely expose large models over gRPC.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=OneLineErrors,
)
mesh.register(app)
inference.register(app)
security.register(app)
trainer.register(app)


def main() -> None:
    app()
