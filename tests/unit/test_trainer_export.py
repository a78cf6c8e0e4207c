"""Export: the merged model computes what base + adapter compute."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmesh.demo.models import init_models
from llmesh.services.trainer.export import merge
from tests.support.sandbox import make_random_adapter


def test_merged_model_matches_base_plus_adapter(tmp_path: Path) -> None:
    init_models(tmp_path)
    base = tmp_path / "models" / "tiny-qwen2"
    adapter = tmp_path / "adapters" / "x@v1"
    make_random_adapter(base, adapter)
    out = merge(base, adapter, tmp_path / "merged")
    assert (out / "config.json").is_file() and not (tmp_path / ".merged.partial").exists()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("如何重置密码？", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out)(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base)(ids).logits
    assert torch.allclose(merged, expected, atol=1e-4) and not torch.allclose(merged, plain, atol=1e-4)
    with pytest.raises(FileExistsError):
        merge(base, adapter, out)
