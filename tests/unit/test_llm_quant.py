"""Packed fp16/int8 Linear layers of the llm model (llm_quant.py) on the tiny test LM."""

from __future__ import annotations

import copy
import importlib
import pathlib
import sys
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from llmesh.demo.models import init_models  # noqa: E402
from tests.support.sandbox import make_random_adapter  # noqa: E402
from tests.support.triton_llm import model_folder  # noqa: E402

sys.path.append(str(model_folder("llm")))  # as Triton's Python backend imports the model's modules
llm_quant: Any = importlib.import_module("llm_quant")


@pytest.fixture(scope="module")
def lm_path(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return init_models(tmp_path_factory.mktemp("quant-home"))["llm"]


@pytest.fixture(scope="module")
def base(lm_path: pathlib.Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(lm_path, dtype=torch.float32).eval()


IDS = torch.tensor([[5, 17, 301, 42, 9, 1200, 77, 3], [8, 8, 8, 1000, 1500, 64, 12, 1]])


def _quantized(model: Any, mode: str) -> Any:
    q = copy.deepcopy(model)
    n = llm_quant.quantize(q, mode)
    assert n == sum(1 for m in model.modules() if type(m) is torch.nn.Linear) and n > 0
    return q


def test_resolve_modes() -> None:
    assert llm_quant.resolve("auto", 500_000) == "none"
    assert llm_quant.resolve("auto", 135_000_000) == "fp16"
    assert llm_quant.resolve(" INT8 ", 1) == "int8"
    with pytest.raises(ValueError, match="quantization must be one of"):
        llm_quant.resolve("int4", 1)


@pytest.mark.parametrize(("mode", "min_cos"), [("fp16", 0.9999), ("int8", 0.99)])
def test_quantized_logits_close_to_fp32(base: Any, mode: str, min_cos: float) -> None:
    q = _quantized(base, mode)
    with torch.inference_mode():
        ref, got = base(IDS).logits, q(IDS).logits
    cos = torch.nn.functional.cosine_similarity(ref, got, dim=-1)
    assert float(cos.min()) > min_cos, float(cos.min())
    if mode == "fp16":
        assert bool((ref.argmax(-1) == got.argmax(-1)).all())


def test_tied_embedding_is_kept_and_weights_dropped(base: Any) -> None:
    q = _quantized(base, "fp16")
    head, emb = q.get_output_embeddings(), q.get_input_embeddings()
    assert isinstance(head, llm_quant.QuantLinear)
    if base.config.tie_word_embeddings:
        assert head.weight is emb.weight  # the embedding lookup still reads the fp32 matrix
    proj = q.model.layers[0].self_attn.q_proj
    assert proj.weight.shape == base.model.layers[0].self_attn.q_proj.weight.shape
    assert proj.weight.untyped_storage().nbytes() <= 4  # placeholder: no second fp32 copy


def test_int8_row_does_not_depend_on_its_batch(base: Any) -> None:
    q = _quantized(base, "int8")
    with torch.inference_mode():
        alone = q(IDS[:1]).logits[0]
        batched = q(torch.cat([IDS[:1], IDS[1:] * 0 + 99])).logits[0]
    assert torch.allclose(alone, batched, atol=1e-4)


def test_lora_on_quantized_base_like_fp32(base: Any, lm_path: pathlib.Path, tmp_path: pathlib.Path) -> None:
    from peft import PeftModel

    make_random_adapter(lm_path, tmp_path / "a", seed=1)
    make_random_adapter(lm_path, tmp_path / "b", seed=2)
    models: dict[str, Any] = {}
    for mode in ("none", "fp16"):
        m = copy.deepcopy(base)
        llm_quant.quantize(m, mode)
        p = PeftModel.from_pretrained(m, str(tmp_path / "a"), adapter_name="a", is_trainable=False)
        p.load_adapter(str(tmp_path / "b"), adapter_name="b", is_trainable=False)
        models[mode] = p.eval()
    ids = IDS[:1].repeat(3, 1)
    names = ["__base__", "a", "b"]
    with torch.inference_mode():
        out = {mode: p(input_ids=ids, adapter_names=names).logits[:, -1] for mode, p in models.items()}
    fp32, quant = out["none"], out["fp16"]
    # the adapters change the output, and the same way on both bases
    assert (fp32[1] - fp32[0]).abs().max() > 1e-2 and (fp32[2] - fp32[1]).abs().max() > 1e-2
    assert torch.allclose(quant, fp32, atol=1e-2), float((quant - fp32).abs().max())
    assert isinstance(
        models["fp16"].base_model.model.model.layers[0].self_attn.q_proj.base_layer, llm_quant.QuantLinear
    )
    with torch.inference_mode():  # a mixed batch equals each row run alone with its adapter
        for j, name in enumerate(names):
            solo = models["fp16"](input_ids=ids[:1], adapter_names=[name]).logits[0, -1]
            assert torch.allclose(solo, quant[j], atol=1e-4)
