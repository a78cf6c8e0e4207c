"""The CLI without a mesh: every failure is one line saying what to do (never a traceback),
client commands pick the gateway when a key is configured, and every help page renders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmesh.cli import app
from llmesh.cli.common import Access
from llmesh.client import ApiKey, ApiKeyError, api_key_from_env, read_api_key_file
from llmesh.client.tokens import refresh_time
from tests.support.sandbox import write_config

# Unset for every run: the developer's own key or config must not leak into these tests.
CLEAN_ENV: dict[str, str | None] = dict.fromkeys(
    (
        "LLMESH_API_KEY_ID",
        "LLMESH_API_SECRET",
        "LLMESH_API_KEY_FILE",
        "LLMESH_GATEWAY",
        "LLMESH_CONFIG",
        "LLMESH_HOME",
        "LLMESH_DEBUG",
    )
)


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    """A mesh configuration on free ports where nothing runs."""
    (tmp_path / "home").mkdir()
    return write_config(tmp_path / "home")


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={**CLEAN_ENV, **(env or {})})
    return result.exit_code, result.output


def one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert "Traceback" not in output and "Error'>" not in output, output
    return lines[0]


def key_file(tmp_path: Path, content: object, mode: int = 0o600) -> Path:
    path = tmp_path / "key.json"
    path.write_text(json.dumps(content))
    path.chmod(mode)
    return path


def test_train_with_a_missing_dataset_says_file_not_found(config: Path) -> None:
    code, out = run("train", "/nonexistent.jsonl", "--name", "x", "--config", str(config))
    assert code == 2 and one_line(out) == "file not found: /nonexistent.jsonl"


@pytest.mark.parametrize(
    "args",
    [
        ("generate", "hi"),
        ("chat", "hi"),
        ("templates",),
        ("adapters", "list"),
        ("keys", "list"),
        ("audit", "verify"),
        ("token", "--key-id", "k", "--secret", "s", "--local"),
    ],
)
def test_a_call_while_the_mesh_is_down_says_so(config: Path, args: tuple[str, ...]) -> None:
    code, out = run(*args, "--config", str(config))
    assert code == 1 and one_line(out).startswith("the mesh is not running (nothing answers at 127.0.0.1:"), out
    assert out.strip().endswith(": llmesh up")


def test_the_gateway_is_used_when_a_key_is_configured(config: Path, tmp_path: Path) -> None:
    env = {"LLMESH_API_KEY_ID": "key_x", "LLMESH_API_SECRET": "s"}
    code, out = run("generate", "hi", "--config", str(config), env=env)
    assert code == 1 and "no gateway answers at 127.0.0.1:" in one_line(out)
    # --gateway overrides the configured address; --local goes straight to the service.
    code, out = run("adapters", "list", "--gateway", "127.0.0.1:9", "--config", str(config), env=env)
    assert "no gateway answers at 127.0.0.1:9)" in one_line(out)
    code, out = run("adapters", "list", "--local", "--config", str(config), env=env)
    assert "nothing answers at" in one_line(out)
    path = key_file(tmp_path, {"key_id": "key_y", "secret": "s"})
    code, out = run("token", "--api-key-file", str(path), "--config", str(config))
    assert code == 1 and "no gateway answers at" in one_line(out)


@pytest.mark.parametrize(
    ("env", "content", "mode", "expect"),
    [
        ({"LLMESH_API_KEY_ID": "key_x"}, None, 0, "LLMESH_API_SECRET is not set"),
        ({"LLMESH_API_SECRET": "s"}, None, 0, "LLMESH_API_KEY_ID is not set"),
        ({}, {"key_id": "key_x"}, 0o600, 'is not an API key file: expected {"key_id": "...", "secret": "..."}'),
        ({}, {"key_id": "key_x", "secret": "s"}, 0o644, "readable by group/others (want 0600); run `chmod 600"),
    ],
)
def test_a_bad_key_configuration_names_the_fix(
    config: Path, tmp_path: Path, env: dict[str, str], content: object, mode: int, expect: str
) -> None:
    args = ["generate", "hi", "--config", str(config)]
    if content is not None:
        args += ["--api-key-file", str(key_file(tmp_path, content, mode))]
    code, out = run(*args, env=env)
    assert code == 2 and expect in one_line(out), out


def test_missing_key_file_and_gateway_without_a_key(config: Path, tmp_path: Path) -> None:
    code, out = run("templates", "--api-key-file", str(tmp_path / "none.json"), "--config", str(config))
    assert code == 2 and one_line(out) == f"API key file not found: {tmp_path / 'none.json'}"
    code, out = run("generate", "hi", "--gateway", "127.0.0.1:9", "--config", str(config))
    assert code == 2 and one_line(out).startswith("--gateway needs an API key: pass --api-key-file FILE")
    code, out = run("token", "--config", str(config))
    assert code == 2 and one_line(out).startswith("no API key: pass --key-id and --secret")


def test_config_errors_name_the_key(config: Path) -> None:
    code, out = run("generate", "hi", "--config", str(config), env={"LLMESH__INFERENCE__SERVER__PORT": "abc"})
    assert code == 2 and one_line(out).startswith("config error: config key 'inference.server.port'")
    code, out = run("status", "--config", "/nonexistent.yaml")
    assert code == 2 and one_line(out) == "config error: config file not found: /nonexistent.yaml"


def test_bad_arguments_are_one_line_too(config: Path) -> None:
    code, out = run("adapters", "split", "faq", "1=a", "--config", str(config))
    assert code == 2 and one_line(out) == "bad arm '1=a': expected VERSION=WEIGHT, e.g. 1=90"


def test_every_help_page_renders() -> None:
    pages = [
        (),
        ("models",),
        ("keys",),
        ("audit",),
        ("compliance",),
        ("adapters",),
        *[(c,) for c in ("up", "down", "status", "logs", "demo", "generate", "chat", "templates", "token", "train")],
        *[("adapters", c) for c in ("list", "show", "promote", "rollback", "delete", "export", "split")],
        *[("keys", c) for c in ("create", "list", "revoke")],
        ("audit", "query"),
        ("audit", "verify"),
        ("compliance", "report"),
        ("models", "init"),
    ]
    for page in pages:
        code, out = run(*page, "--help")
        assert code == 0 and "Usage:" in out, (page, out)
    _, out = run("generate", "--help")
    assert "--api-key-file" in out and "--gateway" in out and "--local" in out


def test_api_keys_from_a_file_and_the_environment(tmp_path: Path) -> None:
    path = key_file(tmp_path, {"key_id": "key_x", "secret": "s3cret"})
    assert read_api_key_file(path) == ApiKey("key_x", "s3cret")
    assert "s3cret" not in repr(read_api_key_file(path))
    assert api_key_from_env({}) is None
    assert api_key_from_env({"LLMESH_API_KEY_ID": "k", "LLMESH_API_SECRET": "s"}) == ApiKey("k", "s")
    with pytest.raises(ApiKeyError):
        api_key_from_env({"LLMESH_API_KEY_ID": "k"})
    # The file wins over the environment; --local ignores both.
    assert Access(api_key_file=path).key() == ApiKey("key_x", "s3cret")
    assert Access(api_key_file=path, local=True).key() is None


def test_tokens_refresh_before_expiry() -> None:
    assert refresh_time(now=0, expires_at=900, margin_s=30) == 870
    assert refresh_time(now=0, expires_at=2, margin_s=30) == 1  # short-lived: half-way
    assert refresh_time(now=10, expires_at=5, margin_s=30) == 5  # already expired: now
