"""Demo model build: determinism, offline reload, tokenizer and chat template.

Nothing here needs tritonserver; the whole module runs in a few seconds on CPU.
"""

from __future__ import annotations

import hashlib
import pathlib

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmesh.models import init_models  # noqa: E402
from llmesh.models.demo import build_llm, faq_pairs, is_complete  # noqa: E402


def _digests(folder: pathlib.Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    h = tmp_path_factory.mktemp("llmesh-home")
    init_models(h)
    return h


def test_faq_has_twenty_pairs() -> None:
    pairs = faq_pairs()
    assert len(pairs) == 20
    assert any(any("\u4e00" <= ch <= "\u9fff" for ch in p["question"]) for p in pairs)


def test_build_is_complete_and_skipped(home: pathlib.Path) -> None:
    paths = init_models(home)
    assert paths == {"llm": home / "models" / "tiny-qwen2", "clip": home / "models" / "tiny-clip"}
    assert is_complete(paths["llm"], "llm") and is_complete(paths["clip"], "clip")
    mtime = (paths["llm"] / "model.safetensors").stat().st_mtime_ns
    init_models(home)  # complete: nothing rebuilt
    assert (paths["llm"] / "model.safetensors").stat().st_mtime_ns == mtime
    (paths["llm"] / "model.safetensors").unlink()
    assert not is_complete(paths["llm"], "llm")
    init_models(home)  # incomplete: rebuilt
    assert is_complete(paths["llm"], "llm")


def test_build_twice_is_byte_identical(home: pathlib.Path, tmp_path: pathlib.Path) -> None:
    other = init_models(tmp_path, force=True)
    for kind in ("llm", "clip"):
        assert _digests(other[kind]) == _digests(home / "models" / other[kind].name), kind


def test_llm_reload_identical_ids_and_logits(home: pathlib.Path, tmp_path: pathlib.Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tokenizers import Tokenizer

    path = home / "models" / "tiny-qwen2"
    tok = AutoTokenizer.from_pretrained(path)
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))  # the trained pipeline as saved
    assert 2000 <= len(tok) <= 4096
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    texts = [p["question"] for p in faq_pairs()] + [p["answer"] for p in faq_pairs()]
    texts += ["Hello   world\n\n  it's 12345 你好！ 🙂"]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids == raw.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == text

    chat = tok.apply_chat_template(
        [{"role": "user", "content": "如何重置密码？"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|im_start|>user\n如何重置密码？<|im_end|>\n<|im_start|>assistant\n"

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.config.max_position_embeddings == 1024
    assert not model.config.tie_word_embeddings
    n = sum(p.numel() for p in model.parameters())
    assert 300_000 <= n <= 1_000_000
    assert 0.15 < float(model.lm_head.weight.detach().std()) < 0.25

    # the in-memory model from a fresh build equals the reloaded one
    fresh = build_llm(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(fresh).eval()
    ids = torch.tensor([tok(texts[0])["input_ids"]])
    with torch.inference_mode():
        a = model(ids).logits
        b = again(ids).logits
    assert torch.equal(a, b)


def test_clip_reload_offline(home: pathlib.Path) -> None:
    from PIL import Image
    from transformers import AutoProcessor, CLIPModel

    path = home / "models" / "tiny-clip"
    proc = AutoProcessor.from_pretrained(path)
    model = CLIPModel.from_pretrained(path).eval()
    img = Image.new("RGB", (40, 30), (200, 10, 10))
    inputs = proc(text=["reset password", "重置密码"], images=[img], return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model(**inputs)
    assert out.text_embeds.shape == (2, 64)
    assert out.image_embeds.shape == (1, 64)
