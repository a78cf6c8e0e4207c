"""The stored form of a dataset, JSONL of canonical ``{"messages": [...]}`` lines, and
its content hash (the dataset id is derived from it)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

from llmesh.runtime.errors import FailedPrecondition
from llmesh.services.trainer.datasets.examples import Example
from llmesh.services.trainer.datasets.json_rows import chat_example, jsonl_rows


def _canonical(example: Example) -> str:
    return json.dumps({"messages": example.as_dicts()}, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def to_jsonl(examples: Iterable[Example]) -> bytes:
    """The stored form: one canonical {"messages": [...]} per line, UTF-8."""
    return "".join(_canonical(ex) + "\n" for ex in examples).encode("utf-8")


def content_hash(examples: Iterable[Example]) -> str:
    """sha256 of `to_jsonl(examples)`: the same content hashes the same on every run."""
    h = hashlib.sha256()
    for ex in examples:
        h.update((_canonical(ex) + "\n").encode("utf-8"))
    return h.hexdigest()


def from_jsonl(data: bytes) -> list[Example]:
    """Read the stored form back, in order and with any duplicates it holds."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FailedPrecondition(f"stored dataset is corrupt: invalid UTF-8 at byte {e.start}") from None
    examples = []
    for row, item in jsonl_rows(text, chat_example):
        if not isinstance(item, Example):
            raise FailedPrecondition(f"stored dataset is corrupt: line {row}: {item}")
        examples.append(item)
    return examples
