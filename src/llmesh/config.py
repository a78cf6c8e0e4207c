"""The mesh configuration: every service's section, composed in one model.

Each service owns its section (``services/<name>/settings.py``); this module composes them
with the mesh-wide parts (home, Redis, Triton) and loads the whole from YAML and the
environment (see :mod:`llmesh.runtime.config` for the resolution order). Only mesh-level
code (launcher, CLI, tests) and each service's ``__main__`` import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from pathlib import Path

from pydantic import field_validator, model_validator

from llmesh.demo.catalog import BUNDLED_LMS, DEFAULT_LM
from llmesh.runtime.config import ConfigError, Section, load_layers, validate
from llmesh.services.embedding.settings import EmbeddingSettings
from llmesh.services.gateway.settings import GatewaySettings
from llmesh.services.inference.settings import InferenceSettings
from llmesh.services.retrieval.settings import RetrievalSettings
from llmesh.services.security.settings import SecuritySettings
from llmesh.services.trainer.settings import TrainerSettings

__all__ = ["ConfigError", "MeshConfig", "load_config"]

DEFAULT_FILE = resources.files("llmesh") / "default.yaml"


class RedisSettings(Section):
    host: str = "127.0.0.1"
    port: int = 6390
    # Path of a redis-server binary; empty: found on PATH or installed by set-up.
    binary: str = ""


class TritonSettings(Section):
    grpc_port: int = 8101
    http_port: int = 8100
    metrics_port: int = 8102
    models: list[str] = ["llm"]
    # The LM served, by name (built under home/models by `llmesh models init`) ...
    llm_model: str = DEFAULT_LM
    # ... unless this names a Hugging Face causal-LM folder of your own.
    llm_path: str = ""
    # Triton model repository; empty: the project's triton_models/.
    model_repository: str = ""

    @field_validator("llm_model")
    @classmethod
    def _bundled(cls, v: str) -> str:
        if v not in BUNDLED_LMS:
            raise ValueError(
                f"'{v}' is not a model llmesh provides; choose one of {', '.join(BUNDLED_LMS)} "
                "(or set triton.llm_path to a Hugging Face folder of your own)"
            )
        return v


class MeshConfig(Section):
    home: Path
    redis: RedisSettings = RedisSettings()
    triton: TritonSettings = TritonSettings()
    inference: InferenceSettings
    gateway: GatewaySettings
    security: SecuritySettings = SecuritySettings()
    trainer: TrainerSettings = TrainerSettings()
    embedding: EmbeddingSettings = EmbeddingSettings()
    retrieval: RetrievalSettings = RetrievalSettings()

    @field_validator("home")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @model_validator(mode="after")
    def _gateway_accepts_issued_tokens(self) -> MeshConfig:
        if self.security.signing_algorithm not in self.gateway.jwt_algorithms:
            raise ValueError(
                f"gateway.jwt_algorithms {self.gateway.jwt_algorithms} must include "
                f"security.signing_algorithm '{self.security.signing_algorithm}'"
            )
        return self

    @property
    def llm_path(self) -> Path:
        """The served LM's folder: ``triton.llm_path``, else ``triton.llm_model`` under home/models."""
        return Path(self.triton.llm_path) if self.triton.llm_path else self.home / "models" / self.triton.llm_model

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


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> MeshConfig:
    """The bundled defaults, then the file (``path`` or ``LLMESH_CONFIG``), then the environment."""
    return validate(MeshConfig, load_layers(MeshConfig, DEFAULT_FILE.read_text(), path, env))
