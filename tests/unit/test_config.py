from pathlib import Path

import pytest
from pydantic import Field

from llmesh.config import DEFAULT_FILE, ConfigError, MeshConfig, load_config
from llmesh.runtime.config import Section, ServerSettings, load_layers, validate
from llmesh.services.gateway.routes import PUBLIC_SERVICES, build_routes
from llmesh.services.gateway.settings import RATE_LIMIT_CLASSES


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


def test_env_override_of_one_rate_limit_keeps_the_other_classes() -> None:
    # The user's report: raising one limit replaced the whole table (IssueToken, class
    # admin, then failed with INTERNAL on every call).
    cfg = load_config(env={"LLMESH__GATEWAY__RATE_LIMITS__GENERATE__REQUESTS": "1000000"})
    limits = cfg.gateway.rate_limits
    assert limits["generate"].requests == 1_000_000 and limits["generate"].window_s == 60
    assert set(limits) == set(RATE_LIMIT_CLASSES.values())
    assert limits["admin"] == load_config(env={}).gateway.rate_limits["admin"]


def test_file_override_merges_into_code_defaults_key_by_key(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("gateway:\n  rate_limits:\n    read: {window_s: 1}\n")
    cfg = load_config(p, env={"LLMESH__GATEWAY__RATE_LIMITS__READ__REQUESTS": "7"})
    assert (cfg.gateway.rate_limits["read"].requests, cfg.gateway.rate_limits["read"].window_s) == (7, 1)
    assert cfg.gateway.rate_limits["job"].requests == 10  # untouched code default


class _Limit(Section):
    n: int
    unit: str = "s"


class _Toy(Section):
    table: dict[str, _Limit] = Field(default_factory=lambda: {"a": _Limit(n=1), "b": _Limit(n=2)})
    server: ServerSettings


def test_code_defaults_are_the_bottom_layer_of_any_model() -> None:
    data = load_layers(_Toy, "server: {port: 1}\n", env={"LLMESH__TABLE__B__UNIT": "ms"})
    toy = validate(_Toy, data)
    assert toy.table == {"a": _Limit(n=1), "b": _Limit(n=2, unit="ms")}
    assert toy.server.host == "127.0.0.1" and toy.server.port == 1


def test_unknown_rate_limit_class_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"gateway\.rate_limits': unknown rate-limit class 'generat'"):
        load_config(env={"LLMESH__GATEWAY__RATE_LIMITS__GENERAT__REQUESTS": "5"})


def test_a_table_without_a_class_that_methods_use_is_refused(tmp_path: Path) -> None:
    data = load_layers(MeshConfig, DEFAULT_FILE.read_text(), env={})
    del data["gateway"]["rate_limits"]["admin"]
    with pytest.raises(ConfigError, match=r"gateway\.rate_limits': no limit for class 'admin'"):
        validate(MeshConfig, data)


def test_every_public_method_is_served_by_the_default_config() -> None:
    cfg = load_config(env={})
    routes = build_routes(dict.fromkeys(PUBLIC_SERVICES, "127.0.0.1:1"))
    assert routes
    for route in routes.values():
        assert RATE_LIMIT_CLASSES.get(route.policy.rate_limit_class, "read") in cfg.gateway.rate_limits, route.path


def test_unknown_upstream_service_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"gateway\.upstreams': unknown service 'llmesh\.nope\.v1\.Nope'"):
        load_config(env={"LLMESH__GATEWAY__UPSTREAMS": "{llmesh.nope.v1.Nope: '127.0.0.1:1'}"})


def test_masking_operators_are_checked_at_load() -> None:
    ok = load_config(env={"LLMESH__GATEWAY__MASKING__EMAIL": "redact", "LLMESH__GATEWAY__MASKING__IP": "hash"})
    assert (ok.gateway.masking["email"], ok.gateway.masking["ip"]) == ("redact", "hash")
    with pytest.raises(ConfigError, match=r"gateway\.masking\.email.*'mask', 'redact', 'hash' or 'pseudonymize'"):
        load_config(env={"LLMESH__GATEWAY__MASKING__EMAIL": "blur"})
    with pytest.raises(ConfigError, match=r"gateway\.masking.*unknown entity 'phone'"):
        load_config(env={"LLMESH__GATEWAY__MASKING__PHONE": "mask"})


def test_the_real_lm_is_served_by_default_under_home_models(tmp_path: Path) -> None:
    from llmesh.demo.catalog import DEFAULT_LM, TEST_LM

    cfg = load_config(env={"LLMESH_HOME": str(tmp_path)})
    assert cfg.triton.llm_model == DEFAULT_LM == "smollm2-135m-instruct"
    assert cfg.llm_path == tmp_path.resolve() / "models" / DEFAULT_LM
    tiny = load_config(env={"LLMESH_HOME": str(tmp_path), "LLMESH__TRITON__LLM_MODEL": TEST_LM})
    assert tiny.llm_path == tmp_path.resolve() / "models" / "tiny-qwen2"


def test_llm_path_overrides_the_named_model(tmp_path: Path) -> None:
    cfg = load_config(env={"LLMESH__TRITON__LLM_PATH": str(tmp_path / "mine")})
    assert cfg.llm_path == tmp_path / "mine"


def test_an_unknown_llm_model_is_refused_naming_the_key_and_the_choices() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(env={"LLMESH__TRITON__LLM_MODEL": "gpt-5"})
    msg = str(e.value)
    assert "triton.llm_model" in msg and "'gpt-5'" in msg
    assert "smollm2-135m-instruct" in msg and "tiny-qwen2" in msg and "triton.llm_path" in msg


def test_test_configs_serve_the_tiny_lm_by_config(tmp_path: Path) -> None:
    from tests.support.sandbox import write_config

    assert load_config(write_config(tmp_path), env={}).triton.llm_model == "tiny-qwen2"
    real = load_config(write_config(tmp_path, llm_model=None), env={})
    assert real.triton.llm_model == "smollm2-135m-instruct"
