from pathlib import Path

import pytest

from llmesh.config import ConfigError, load_config


def test_default_config_binds_loopback_and_has_peers() -> None:
    cfg = load_config(env={})
    assert cfg.inference.server.host == "127.0.0.1"
    assert cfg.inference.peers.triton == "127.0.0.1:8101"
    assert cfg.home.is_absolute()


def test_env_overrides_nested_keys_and_home(tmp_path: Path) -> None:
    cfg = load_config(
        env={
            "LLMESH__INFERENCE__SERVER__PORT": "7001",
            "LLMESH_HOME": str(tmp_path),
            "LLMESH__TRITON__MODELS": "[llm, clip]",
        }
    )
    assert cfg.inference.server.port == 7001
    assert cfg.home == tmp_path.resolve()
    assert cfg.triton.models == ["llm", "clip"]


def test_file_overrides_default(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("inference:\n  chat_ttl_seconds: 5\n")
    assert load_config(p, env={}).inference.chat_ttl_seconds == 5


def test_missing_peer_fails_fast_naming_the_key(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("inference:\n  peers: {triton: null}\n")
    with pytest.raises(ConfigError, match=r"inference\.peers\.triton"):
        load_config(p, env={})


def test_unknown_key_is_rejected(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("inference:\n  max_prompt_charz: 5\n")
    with pytest.raises(ConfigError, match="max_prompt_charz"):
        load_config(p, env={})


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", env={})
