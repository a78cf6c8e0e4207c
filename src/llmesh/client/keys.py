"""API keys as clients hold them: given in code, read from the JSON file ``llmesh demo``
writes (``LLMESH_HOME/demo/api-key.json``, 0600), or from the environment."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from llmesh.runtime.files import read_secret

ENV_KEY_ID = "LLMESH_API_KEY_ID"
ENV_SECRET = "LLMESH_API_SECRET"


class ApiKeyError(ValueError):
    """The key could not be read; the message names the file or variable and the fix."""


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    secret: str  # as shown once by `llmesh keys create`

    def __repr__(self) -> str:  # never print the secret by accident
        return f"ApiKey(key_id={self.key_id!r}, secret=...)"


def read_api_key_file(path: Path) -> ApiKey:
    """``{"key_id": ..., "secret": ...}`` from a file only its owner may read."""
    try:
        raw = read_secret(path)
    except FileNotFoundError:
        raise ApiKeyError(f"API key file not found: {path}") from None
    try:
        data = json.loads(raw)
        return ApiKey(str(data["key_id"]), str(data["secret"]))
    except (ValueError, KeyError, TypeError):
        raise ApiKeyError(f'{path} is not an API key file: expected {{"key_id": "...", "secret": "..."}}') from None


def api_key_from_env(env: Mapping[str, str] | None = None) -> ApiKey | None:
    """The key in ``LLMESH_API_KEY_ID`` / ``LLMESH_API_SECRET``; None when neither is set."""
    env = os.environ if env is None else env
    key_id, secret = env.get(ENV_KEY_ID, ""), env.get(ENV_SECRET, "")
    if not key_id and not secret:
        return None
    if not key_id or not secret:
        missing = ENV_KEY_ID if not key_id else ENV_SECRET
        raise ApiKeyError(f"{missing} is not set: an API key needs both {ENV_KEY_ID} and {ENV_SECRET}")
    return ApiKey(key_id, secret)
