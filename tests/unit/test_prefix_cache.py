"""The llm model's prefix cache (triton_models/llm/1/llm_prefix.py): the store itself, and
generation with it on equals generation with it off, reused prefixes counted."""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from llmesh.demo.models import init_models  # noqa: E402
from tests.support.triton_llm import load_llm, model_folder, run  # noqa: E402

sys.path.insert(0, str(model_folder("llm")))
from llm_prefix import MIN_REUSE, PrefixCache  # type: ignore[import-not-found]  # noqa: E402  # the model folder, as Triton puts it on sys.path


def _kv(n: int, layers: int = 2, fill: float = 0.0) -> list[tuple[Any, Any]]:
    return [(torch.full((1, n, 4), fill + i), torch.full((1, n, 4), -fill - i)) for i in range(layers)]


def test_lookup_longest_common_prefix_per_adapter() -> None:
    cache = PrefixCache(1 << 20)
    cache.store("", list(range(10)), _kv(10))
    cache.store("", [0, 1, 2, 3, 4, 5, 99, 98], _kv(8, fill=5.0))
    k, kv = cache.lookup("", [0, 1, 2, 3, 4, 5, 6, 7, 50])
    assert k == 8 and kv is not None and kv[0][0].shape == (1, 8, 4) and float(kv[0][0][0, 0, 0]) == 0.0
    assert cache.lookup("faq-v1", list(range(10)))[0] == 0  # LoRA changes the KV: per adapter
    assert cache.lookup("", list(range(10)))[0] == 9  # all but the last token: its logits are needed
    assert cache.lookup("", [7, 7, 7, 7, 7, 7])[0] == 0
    assert cache.lookup("", list(range(MIN_REUSE - 1)) + [77, 78])[0] == 0  # too short to be worth it


def test_store_subsumes_prefixes_and_evicts_lru_within_budget() -> None:
    one = 2 * 2 * 10 * 4 * 4  # bytes of _kv(10)
    cache = PrefixCache(3 * one)
    cache.store("", list(range(6)), _kv(6))
    cache.store("", list(range(10)), _kv(10))  # extends the first: it replaces it
    assert len(cache.entries) == 1
    cache.store("", list(range(8)), _kv(8))  # covered by the longer one: nothing new
    assert len(cache.entries) == 1
    for start in (100, 200, 300):
        cache.store("", list(range(start, start + 10)), _kv(10))
    assert cache.used <= 3 * one and len(cache.entries) == 3
    assert cache.lookup("", list(range(10)) + [5])[0] == 0  # the oldest went first
    assert PrefixCache(0).enabled is False
    cache.store("", list(range(1000, 1100)), _kv(100))  # larger than the budget: not kept
    assert cache.lookup("", list(range(1000, 1100)))[0] == 0


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    home: pathlib.Path = tmp_path_factory.mktemp("llmesh-home")
    init_models(home)
    params = {"model_path": str(home / "models" / "tiny-qwen2"), "adapter_dir": str(home / "adapters")}
    _, plain = load_llm(params)
    _, cached = load_llm({**params, "prefix_cache_mb": "64"})
    yield plain, cached
    plain.finalize()
    cached.finalize()


def _reused(model: Any) -> int:
    model.engine.metrics.flush()
    return int(sum(model.engine.metrics._counters["reused"].increments))


def test_generation_with_reused_prefixes_equals_without(models: tuple[Any, Any]) -> None:
    plain, cached = models
    reqs = [
        {"prompt": "How do I reset my password?", "max_tokens": 16, "temperature": 0.0},
        {"prompt": "How do I reset my VPN token?", "max_tokens": 16, "temperature": 0.8, "seed": 5},
        {"prompt": "如何重置密码？", "max_tokens": 12, "temperature": 0.0, "repetition_penalty": 1.2},
    ]
    want = [run(plain, r)[0]["text"] for r in reqs]
    assert [run(cached, r)[0]["text"] for r in reqs] == want  # later rows reuse the system turn
    first = _reused(cached)
    assert first > 0
    together = run(cached, *reqs)  # a prefill mixing full hits, partial hits, all rows at once
    assert [g["text"] for g in together] == want
    assert _reused(cached) > first


def test_chat_turn_reuses_the_previous_turn(models: tuple[Any, Any]) -> None:
    plain, cached = models
    turn1 = [{"role": "user", "content": "Where do I submit invoices?"}]
    reply = run(cached, {"messages_json": _json(turn1), "max_tokens": 12, "temperature": 0.0})[0]["text"]
    before = _reused(cached)
    turn2 = [*turn1, {"role": "assistant", "content": reply}, {"role": "user", "content": "And expenses?"}]
    req = {"messages_json": _json(turn2), "max_tokens": 12, "temperature": 0.0}
    assert run(cached, req)[0]["text"] == run(plain, req)[0]["text"]
    first = cached.tokenizer.apply_chat_template(turn1, add_generation_prompt=True, tokenize=True)["input_ids"]
    # The first turn's prompt at least; its reply's tokens too where the reply's text tokenizes
    # back to them (a real model's text does; this random LM's partial UTF-8 bytes do not).
    assert _reused(cached) - before >= len(first)


def _json(messages: list[dict[str, str]]) -> str:
    import json

    return json.dumps(messages, ensure_ascii=False)
