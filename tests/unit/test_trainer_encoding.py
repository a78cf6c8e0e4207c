"""Trainer encoding and evaluation on the tiny demo LM (CPU, a few seconds).

The point of the shared encoding is that training, evaluation and serving see the same
prompt: the serving side is checked against the Triton model (triton_models/llm/1) itself.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from llmesh.demo.models import init_models  # noqa: E402
from llmesh.services.trainer.encoding import (  # noqa: E402
    IGNORE_INDEX,
    collate,
    encode,
    pad_token_id,
    prompt_ids,
    prompt_text,
)
from llmesh.services.trainer.evaluate import (  # noqa: E402
    Metrics,
    evaluate,
    exact_match,
    loss_curve_png,
    rouge_l,
)
from tests.support.triton_llm import FakeRequest, load_llm, run  # noqa: E402

EXAMPLES: list[list[dict[str, str]]] = [
    [
        {"role": "user", "content": "如何重置密码？"},
        {"role": "assistant", "content": "请访问自助门户重置密码。"},
    ],
    [
        {"role": "system", "content": "You are the IT helpdesk."},
        {"role": "user", "content": "The VPN is down."},
        {"role": "assistant", "content": "Restart the VPN client and sign in again."},
    ],
    [
        {"role": "user", "content": "打印机卡纸了"},
        {"role": "assistant", "content": "Open the tray."},
        {"role": "user", "content": "还是不行"},
        {"role": "assistant", "content": "请联系 IT 服务台，分机 8000。"},
    ],
]


@pytest.fixture(scope="module")
def llm_path(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return init_models(tmp_path_factory.mktemp("trainer-home"))["llm"]


@pytest.fixture(scope="module")
def tok(llm_path: pathlib.Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llm_path)


def _load(llm_path: pathlib.Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llm_path, dtype=torch.float32)


@pytest.fixture(scope="module")
def model(llm_path: pathlib.Path) -> Any:
    return _load(llm_path).eval()  # shared read-only: tests that train load their own


@pytest.fixture(scope="module")
def served(llm_path: pathlib.Path) -> Iterator[tuple[Any, Any]]:
    """The real Triton model (fake pb_utils), running its decode thread: (llm_request module, model)."""
    _, m = load_llm({"model_path": str(llm_path), "adapter_dir": str(llm_path.parent / "adapters")})
    yield sys.modules["llm_request"], m
    m.finalize()


# --------------------------------------------------------------------------- encoding


def test_encode_masks_the_prompt_and_ends_with_eos(tok: Any) -> None:
    for ex in EXAMPLES:
        enc = encode(tok, ex, max_length=512)
        ids, labels = enc["input_ids"], enc["labels"]
        assert len(ids) == len(labels) == len(enc["attention_mask"]) and set(enc["attention_mask"]) == {1}
        n_prompt = len(prompt_ids(tok, ex))
        assert ids[:n_prompt] == prompt_ids(tok, ex)
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        target = labels[n_prompt:]
        assert target == ids[n_prompt:] and IGNORE_INDEX not in target
        assert target[-1] == tok.eos_token_id
        assert tok.decode(target[:-1]) == ex[-1]["content"]
        # the chat template of the whole conversation agrees token for token
        full = tok.apply_chat_template(ex, tokenize=False)
        assert ids == tok(full, add_special_tokens=False)["input_ids"][: len(ids)]

    whole = encode(tok, EXAMPLES[0], max_length=512, response_only=False)
    assert whole["labels"] == whole["input_ids"]


def test_truncation_keeps_the_prompt_end_and_the_target(tok: Any) -> None:
    long_history = [{"role": "user", "content": "先说点别的。" * 80}, {"role": "assistant", "content": "好的。"}]
    ex = long_history + EXAMPLES[0]
    p, full = prompt_ids(tok, ex), encode(tok, ex, max_length=4096)
    n_target = sum(1 for x in full["labels"] if x != IGNORE_INDEX)
    enc = encode(tok, ex, max_length=64)
    assert len(enc["input_ids"]) == 64
    assert enc["input_ids"][-n_target:] == full["input_ids"][-n_target:]  # whole target + eos
    assert enc["input_ids"][: 64 - n_target] == p[-(64 - n_target) :]  # the prompt's end
    assert tok.decode(enc["input_ids"][: 64 - n_target]).endswith("<|im_start|>assistant\n")

    # a target longer than max_length: its beginning survives, after the last prompt token
    big = [{"role": "user", "content": "写一段长文。"}, {"role": "assistant", "content": "网络 VPN 密码 " * 60}]
    enc = encode(tok, big, max_length=32)
    target = [x for x in enc["labels"] if x != IGNORE_INDEX]
    assert len(enc["input_ids"]) == 32 and len(target) == 31
    assert enc["input_ids"][0] == prompt_ids(tok, big)[-1]
    assert target == encode(tok, big, max_length=4096)["input_ids"][len(prompt_ids(tok, big)) :][:31]
    assert tok.eos_token_id not in target  # a cut answer must not teach stopping there

    with pytest.raises(ValueError):
        encode(tok, big, max_length=1)
    with pytest.raises(ValueError):
        encode(tok, big[:1], max_length=64)  # no assistant target
    with pytest.raises(ValueError):
        encode(tok, [big[0], {"role": "assistant", "content": None}], max_length=64)


def test_collate_right_pads(tok: Any) -> None:
    encs = [encode(tok, ex, max_length=512) for ex in EXAMPLES]
    pad = pad_token_id(tok)
    batch = collate(encs, pad)
    width = max(len(e["input_ids"]) for e in encs)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    for key, t in batch.items():
        assert t.shape == (3, width) and t.dtype == torch.long, key
    for i, e in enumerate(encs):
        n = len(e["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == e["input_ids"]
        assert batch["input_ids"][i, n:].eq(pad).all()
        assert batch["labels"][i, n:].eq(IGNORE_INDEX).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
    with pytest.raises(ValueError):
        collate([], pad)


def test_prompt_is_what_model_py_serves(tok: Any, model: Any, served: tuple[Any, Any]) -> None:
    from llmesh.services.trainer.evaluate import _generate

    request, server = served
    for ex in EXAMPLES:
        ex = [dict(m, name="x") for m in ex]  # model.py ignores extra keys: so must training
        req = {"messages_json": json.dumps(ex[:-1], ensure_ascii=False), "max_tokens": 12, "temperature": 0.0}
        row = request.Row(FakeRequest(req))
        request.parse(row, server.tokenizer, server.max_positions)
        assert row.prompt_ids == prompt_ids(tok, ex)
        assert tok.decode(row.prompt_ids) == prompt_text(tok, ex)
        # and evaluation's greedy generation says what the server says
        text = run(server, req)[0]["text"]
        assert _generate(model, tok, [ex], max_length=512, max_new_tokens=12) == [text]


# --------------------------------------------------------------------------- text scores


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("the cat sat on the mat", "the cat sat on the mat", 1.0),
        ("the cat sat", "the cat sat on the mat", 2 * 1.0 * 0.5 / 1.5),  # P=3/3, R=3/6
        ("The  CAT\nsat", "the cat sat", 1.0),  # case and whitespace do not matter
        ("dog", "the cat", 0.0),
        ("请访问自助门户", "请访问门户", 2 * (5 / 7) * 1.0 / (5 / 7 + 1.0)),  # characters, LCS 5
        ("重置 密码", "重置密码", 1.0),  # CJK: whitespace is not a token
        ("VPN 密码", "VPN密码", 1.0),  # mixed text with CJK: characters
        ("ＶＰＮ", "vpn", 1.0),  # NFKC: full-width letters
        ("", "", 1.0),
        ("  ", "", 1.0),
        ("", "reference", 0.0),
        ("prediction", "", 0.0),
        ("你好", "再见", 0.0),
    ],
)
def test_rouge_l(prediction: str, reference: str, expected: float) -> None:
    assert rouge_l(prediction, reference) == pytest.approx(expected)
    assert rouge_l(reference, prediction) == pytest.approx(expected)  # F1 is symmetric


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("Restart the VPN client.", "restart the vpn client", True),
        ("  Restart   the\tVPN client ", "Restart the VPN client", True),
        ('"Restart the VPN client!"', "Restart the VPN client", True),
        ("Restart the VPN, client", "Restart the VPN client", False),  # inner punctuation counts
        ("请访问自助门户。", "请访问自助门户", True),
        ("「请访问自助门户」", "请访问自助门户", True),
        ("请访问自助门户！", "请访问自助门户!", True),  # full-width vs ASCII (NFKC)
        ("ＶＰＮ　密码", "vpn 密码", True),  # full-width letters and ideographic space
        ("Straße", "STRASSE", True),  # case folding, not just lower()
        ("请访问门户", "请访问自助门户", False),
        ("", "", True),
        ("...", "", True),
        ("", "answer", False),
    ],
)
def test_exact_match(prediction: str, reference: str, expected: bool) -> None:
    assert exact_match(prediction, reference) is expected


# --------------------------------------------------------------------------- evaluate


def test_evaluate_base_model(tok: Any, model: Any) -> None:
    m = evaluate(model, tok, EXAMPLES, max_new_tokens=8, batch_size=2)
    assert isinstance(m, Metrics) and m.examples == 3
    assert math.isfinite(m.loss) and m.loss > 0
    assert m.perplexity == pytest.approx(math.exp(m.loss), rel=1e-6)
    assert 0.0 <= m.rouge_l <= 1.0 and 0.0 <= m.exact_match <= 1.0
    assert set(m.as_dict()) == {"loss", "perplexity", "rouge_l", "exact_match", "examples"}
    assert not model.training  # eval mode kept
    # the loss is the mean over response tokens, whatever the batching
    assert evaluate(model, tok, EXAMPLES, max_new_tokens=8, batch_size=1).loss == pytest.approx(m.loss, rel=1e-5)
    with pytest.raises(ValueError):
        evaluate(model, tok, [])


def test_evaluate_peft_model_restores_train_mode(tok: Any, llm_path: pathlib.Path) -> None:
    from peft import LoraConfig, get_peft_model

    base = _load(llm_path)
    reference = evaluate(base, tok, EXAMPLES, max_new_tokens=8)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft.train()
    m = evaluate(peft, tok, EXAMPLES, max_new_tokens=8)
    assert peft.training  # restored
    # LoRA starts as the identity (B = 0): same scores as the base model
    assert m.loss == pytest.approx(reference.loss, rel=1e-5)
    assert (m.rouge_l, m.exact_match, m.examples) == (reference.rouge_l, reference.exact_match, 3)


def test_training_on_encoded_examples_memorises_them(tok: Any, llm_path: pathlib.Path) -> None:
    torch.manual_seed(0)
    model = _load(llm_path)
    train = EXAMPLES[:2]
    before = evaluate(model, tok, train, max_new_tokens=24)
    batch = collate([encode(tok, ex, max_length=128) for ex in train], pad_token_id(tok))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    after = evaluate(model, tok, train, max_new_tokens=24)
    assert model.training
    assert after.loss < before.loss / 10
    assert after.exact_match == 1.0 and after.rouge_l == 1.0
    assert before.exact_match == 0.0


# --------------------------------------------------------------------------- plot


def test_loss_curve_png(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "plots" / "loss.png"
    train = [(s, 5.0 / s) for s in range(1, 51)] + [(51, float("nan"))]
    loss_curve_png(train, [(10, 0.6), (20, 0.3), (50, 0.2)], path, "job-1: faq@1")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82")
    assert [p.name for p in path.parent.iterdir()] == ["loss.png"]  # no temp file left
    loss_curve_png([], [], path, "empty")  # replaces the file, no data is fine
    assert path.read_bytes().startswith(b"\x89PNG")
