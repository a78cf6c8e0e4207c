"""Typed configuration: one YAML file plus environment overrides.

Resolution order (later wins): the defaults the models declare in code, the bundled
``llmesh/default.yaml``, the file named by ``LLMESH_CONFIG`` (or passed explicitly), then
environment variables ``LLMESH__SECTION__KEY=value`` (value parsed as YAML) and
``LLMESH_HOME``. Every layer merges into the one below key by key, tables (mappings)
included: raising one rate limit keeps the other classes. Lists and scalars replace.
Peer addresses have no defaults in code: a service whose peers are missing
refuses to start, naming the key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from llmesh.runtime.files import local_address

ENV_PREFIX = "LLMESH__"


class ConfigError(RuntimeError):
    """The configuration is incomplete or invalid; the message names the key."""


class Section(BaseModel):
    """A configuration section: unknown keys are errors, values are read-only."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(ge=0, le=65535)
    metrics_port: int = Field(default=0, ge=0, le=65535, description="0 disables /metrics")
    # Matches Kubernetes' default terminationGracePeriodSeconds (30 s) less a margin.
    grace_seconds: float = 25.0
    max_message_bytes: int = 16 * 1024 * 1024
    keepalive_time_ms: int = 30_000
    keepalive_timeout_ms: int = 10_000
    max_concurrent_streams: int = 256

    @property
    def local_address(self) -> str:
        """Where this host reaches the server (a wildcard bind is reached on loopback)."""
        return local_address(self.host, self.port)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = yaml.safe_load(raw) if raw else raw
    if env.get("LLMESH_HOME"):
        tree["home"] = env["LLMESH_HOME"]
    return tree


def code_defaults(model: type[BaseModel]) -> dict[str, Any]:
    """The defaults ``model`` declares in code (``default`` and ``default_factory``, and
    those of nested sections that have no default as a whole), as plain data: the bottom
    layer, so that a table default such as ``gateway.rate_limits`` merges with an
    override of one of its keys instead of being replaced by it."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        if not field.is_required():
            value = field.get_default(call_default_factory=True)
            out[name] = value if field.annotation is None else TypeAdapter(field.annotation).dump_python(value)
        elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            if nested := code_defaults(field.annotation):
                out[name] = nested
    return out


def load_layers(
    model: type[BaseModel], defaults: str, path: str | Path | None = None, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """``model``'s code defaults, then the defaults (YAML text), the file and the
    environment, each merged into the layers below it key by key."""
    env = os.environ if env is None else env
    data = _merge(code_defaults(model), yaml.safe_load(defaults) or {})
    path = path or env.get("LLMESH_CONFIG")
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        data = _merge(data, yaml.safe_load(p.read_text()) or {})
    return _merge(data, _env_overrides(env))


M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], data: Mapping[str, Any]) -> M:
    """``model`` from ``data``; the first problem is reported with its dotted key."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(x) for x in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"config key '{key}': {msg} ({len(e.errors())} error(s))") from e
