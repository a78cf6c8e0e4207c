"""Typed configuration: one YAML file plus environment overrides.

Resolution order (later wins): the bundled ``default.yaml``, the file named by
``LLMESH_CONFIG`` (or passed explicitly), then environment variables
``LLMESH__SECTION__KEY=value`` (value parsed as YAML) and ``LLMESH_HOME``.
Peer addresses have no defaults in code: a service whose peers are missing
refuses to start, naming the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_FILE = Path(__file__).with_name("default.yaml")
ENV_PREFIX = "LLMESH__"


class ConfigError(RuntimeError):
    """The configuration is incomplete or invalid; the message names the key."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Model):
    host: str = "127.0.0.1"
    port: int = Field(ge=0, le=65535)
    metrics_port: int = Field(default=0, ge=0, le=65535, description="0 disables /metrics")
    # Matches Kubernetes' default terminationGracePeriodSeconds (30 s) less a margin.
    grace_seconds: float = 25.0
    max_message_bytes: int = 16 * 1024 * 1024
    keepalive_time_ms: int = 30_000
    keepalive_timeout_ms: int = 10_000
    max_concurrent_streams: int = 256


class RedisSettings(_Model):
    host: str = "127.0.0.1"
    port: int = 6390
    # Path of a redis-server binary; empty: found on PATH or installed by set-up.
    binary: str = ""


class TritonSettings(_Model):
    grpc_port: int = 8101
    http_port: int = 8100
    metrics_port: int = 8102
    models: list[str] = ["llm"]
    llm_path: str = ""
    # Triton model repository; empty: the project's triton_models/.
    model_repository: str = ""


class InferencePeers(_Model):
    triton: str
    redis: str


class InferenceSettings(_Model):
    server: ServerSettings
    peers: InferencePeers
    model: str = "llm"
    max_prompt_chars: int = 16_000
    default_max_tokens: int = 128
    max_tokens_limit: int = 1024
    # Seconds a call may take when the client sets no deadline.
    default_timeout_s: float = 120.0
    chat_max_messages: int = 32
    chat_ttl_seconds: int = 3600
    # YAML template library; empty: the bundled one.
    templates_path: str = ""


class SecuritySettings(_Model):
    server: ServerSettings = ServerSettings(port=50062, metrics_port=9462)
    # JWT "iss" and "aud" of issued tokens.
    issuer: str = "llmesh"
    audience: str = "llmesh-gateway"
    # Longest token lifetime; also how long a rotated-out signing key stays in the JWKS.
    token_ttl_seconds: int = Field(default=900, ge=1, le=86_400)
    # HS256 is for development only: tokens are signed with a secret shared with the
    # gateway (LLMESH_HOME/security/jwt-hs256.key) instead of a key published as JWKS.
    signing_algorithm: Literal["ES256", "RS256", "HS256"] = "ES256"


class TrainerSettings(_Model):
    server: ServerSettings = ServerSettings(port=50063, metrics_port=9463)
    # ImportDataset reads files only inside this folder; empty: LLMESH_HOME/datasets.
    dataset_root: str = ""
    max_dataset_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    # Jobs run one at a time in a worker process; one that dies is restarted from its
    # last checkpoint up to this many times in all.
    max_attempts: int = Field(default=3, ge=1)
    checkpoint_every_steps: int = Field(default=20, ge=1)
    # Eval examples generated greedily for ROUGE-L / exact match (the loss uses all).
    eval_generate_limit: int = Field(default=64, ge=1)


class GatewayPeers(_Model):
    security: str
    redis: str


class RateLimitSettings(_Model):
    requests: int = Field(ge=1)
    window_s: float = Field(gt=0)


def _default_limits() -> dict[str, RateLimitSettings]:
    per_minute = {"read": 600, "write": 120, "generate": 120, "embed": 600, "job": 10, "admin": 60}
    return {k: RateLimitSettings(requests=v, window_s=60) for k, v in per_minute.items()}


class GatewaySettings(_Model):
    server: ServerSettings
    peers: GatewayPeers
    # Public service name → upstream address; only these are exposed.
    upstreams: dict[str, str]
    issuer: str = "llmesh"
    audience: str = "llmesh-gateway"
    # Accepted token algorithms; HS256 (development) verifies with the shared
    # LLMESH_HOME/security/jwt-hs256.key, the others with the security service's JWKS.
    jwt_algorithms: list[Literal["ES256", "RS256", "HS256"]] = Field(default=["ES256", "RS256"], min_length=1)
    jwt_leeway_s: float = 30.0
    # HMAC request signatures on every authenticated call; timestamps within ±skew.
    require_signature: bool = True
    signature_skew_s: float = 300.0
    rate_limits: dict[str, RateLimitSettings] = Field(default_factory=_default_limits)
    tokens_per_minute: int = 20_000
    # Entity → operator (mask, redact, hash, pseudonymize); see gateway/masking.py.
    masking: dict[str, str] = {}
    default_timeout_s: float = 120.0
    # Audit records go to the security service in batches at least this often.
    audit_flush_interval_s: float = Field(default=0.5, gt=0)


class MeshConfig(_Model):
    home: Path
    redis: RedisSettings = RedisSettings()
    triton: TritonSettings = TritonSettings()
    inference: InferenceSettings
    gateway: GatewaySettings
    security: SecuritySettings = SecuritySettings()
    trainer: TrainerSettings = TrainerSettings()

    @field_validator("home")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @model_validator(mode="after")
    def _gateway_accepts_issued_tokens(self) -> MeshConfig:
        if self.security.signing_algorithm not in self.gateway.jwt_algorithms:
            raise ValueError(f"gateway.jwt_algorithms {self.gateway.jwt_algorithms} must include "
                             f"security.signing_algorithm '{self.security.signing_algorithm}'")
        return self

    @property
    def llm_path(self) -> Path:
        return Path(self.triton.llm_path) if self.triton.llm_path else self.home / "models" / "tiny-qwen2"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @property
    def adapter_dir(self) -> Path:
        return self.home / "adapters"

    @property
    def trainer_dir(self) -> Path:
        return self.home / "trainer"

    @property
    def dataset_root(self) -> Path:
        return Path(self.trainer.dataset_root) if self.trainer.dataset_root else self.home / "datasets"


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
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = yaml.safe_load(raw) if raw else raw
    if env.get("LLMESH_HOME"):
        tree["home"] = env["LLMESH_HOME"]
    return tree


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> MeshConfig:
    env = os.environ if env is None else env
    data: dict[str, Any] = yaml.safe_load(DEFAULT_FILE.read_text())
    path = path or env.get("LLMESH_CONFIG")
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        data = _merge(data, yaml.safe_load(p.read_text()) or {})
    data = _merge(data, _env_overrides(env))
    try:
        return MeshConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(x) for x in first["loc"])
        raise ConfigError(f"config key '{key}': {first['msg']} ({len(e.errors())} error(s))") from e
