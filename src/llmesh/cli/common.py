"""What every ``llmesh`` command module shares: consoles, the config option, how a client
command reaches the mesh (the gateway with an API key, or this host's services directly),
and errors as one line that says what to do."""

from __future__ import annotations

import os
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import grpc
import typer
from rich.console import Console
from typer.core import TyperGroup

from llmesh.client.errors import describe_error, is_unreachable
from llmesh.client.keys import ENV_KEY_ID, ENV_SECRET, ApiKey, ApiKeyError, api_key_from_env, read_api_key_file
from llmesh.config import ConfigError, MeshConfig, load_config
from llmesh.runtime.config import ServerSettings
from llmesh.runtime.files import SecretFileError

console = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config (default: LLMESH_CONFIG or the bundled default).")
]
GatewayOpt = Annotated[
    str | None,
    typer.Option(
        "--gateway",
        envvar="LLMESH_GATEWAY",
        help="host:port of the gateway (default: from config). Used when an API key is configured.",
    ),
]
ApiKeyFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--api-key-file",
        envvar="LLMESH_API_KEY_FILE",
        help=f'API key JSON {{"key_id", "secret"}} (0600; `llmesh demo` writes LLMESH_HOME/demo/api-key.json). '
        f"Or set {ENV_KEY_ID} and {ENV_SECRET}. With a key, the call goes through the gateway.",
    ),
]
LocalOpt = Annotated[
    bool,
    typer.Option(
        "--local", help="Call the service on this host directly with its internal identity, even if a key is set."
    ),
]

DEBUG_ENV = "LLMESH_DEBUG"  # set: errors raise with their traceback


@dataclass(frozen=True)
class Target:
    """Where a command's calls go, for its error messages."""

    address: str
    via_gateway: bool


TARGET: ContextVar[Target | None] = ContextVar("llmesh_cli_target", default=None)


@dataclass(frozen=True)
class Access:
    """A client command's connection options (``--gateway``, ``--api-key-file``, ``--local``)."""

    gateway: str | None = None
    api_key_file: Path | None = None
    local: bool = False

    def key(self) -> ApiKey | None:
        """The configured API key: the file, else the environment; none with ``--local``."""
        if self.local:
            return None
        if self.api_key_file is not None:
            return read_api_key_file(self.api_key_file)
        return api_key_from_env()


class CommandError(Exception):
    """A failure the command explains itself: printed as is, exits with ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = 1) -> NoReturn:
    raise CommandError(message, code)


def mesh_config(path: Path | None) -> MeshConfig:
    """The mesh configuration (bundled defaults, the file, the environment)."""
    return load_config(path)


def remember(target: Target) -> None:
    TARGET.set(target)


def channel_for(cfg: MeshConfig, service: ServerSettings, access: Access, direct: str | None = None) -> grpc.Channel:
    """The channel a client command calls ``service`` on: through the gateway when an API
    key is configured (signed, rate-limited, audited, like any client), else straight to the
    service at ``direct`` or its configured address, as this host's operator."""
    from llmesh.client.gateway import gateway_channel
    from llmesh.client.local import local_channel

    key = access.key()
    if key is None:
        if access.gateway:
            fail(f"--gateway needs an API key: pass --api-key-file FILE or set {ENV_KEY_ID} and {ENV_SECRET}", code=2)
        target = Target(direct or service.local_address, via_gateway=False)
        remember(target)
        return local_channel(target.address, cfg.home)
    target = Target(access.gateway or cfg.gateway.server.local_address, via_gateway=True)
    remember(target)
    return gateway_channel(target.address, key)


def explain(e: Exception, target: Target | None) -> tuple[str, int]:
    """One line for a failure (and the exit code): what went wrong and what to do."""
    if isinstance(e, CommandError):
        return str(e), e.code
    if isinstance(e, grpc.RpcError):
        if is_unreachable(e):
            where = f"no gateway answers at {target.address}" if target and target.via_gateway else None
            where = where or (f"nothing answers at {target.address}" if target else "no answer")
            hint = ", or pass --gateway HOST:PORT" if target and target.via_gateway else ""
            return f"the mesh is not running ({where}): llmesh up{hint}", 1
        failure = describe_error(e)
        hint = ""
        if failure.code == "UNAUTHENTICATED" and target and target.via_gateway:
            hint = f" (check the API key: --api-key-file, or {ENV_KEY_ID} / {ENV_SECRET})"
        return f"{failure}{hint}", 1
    if isinstance(e, ConfigError):
        return f"config error: {e}", 2
    if isinstance(e, ApiKeyError | SecretFileError):
        return str(e), 2
    if isinstance(e, IsADirectoryError):
        return f"is a folder, not a file: {e.filename}", 2
    if isinstance(e, FileNotFoundError):
        return f"file not found: {e.filename}", 2
    if isinstance(e, PermissionError):
        return f"permission denied: {e.filename}", 2
    if isinstance(e, OSError):
        return f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}", 1
    detail = str(e) or "unexpected error"
    return f"error: {detail} (set {DEBUG_ENV}=1 to see the traceback)", 1


class OneLineErrors(TyperGroup):
    """The root command group: any failure of a command is printed as one line on stderr
    (no traceback unless LLMESH_DEBUG is set) and sets the exit status."""

    def invoke(self, ctx: Any) -> Any:  # typer's (vendored click) Context
        TARGET.set(None)
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # typer's own: --help, usage errors, typer.Exit
        except Exception as e:
            if os.environ.get(DEBUG_ENV):
                raise
            message, code = explain(e, TARGET.get())
            typer.secho(message, err=True, fg="red")
            raise typer.Exit(code) from None
