"""Dataset format names and detection from a file's name and first bytes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import PurePosixPath

from llmesh.runtime.errors import InvalidArgument
from llmesh.services.trainer.datasets.rows import clip

FORMATS = ("alpaca_json", "alpaca_jsonl", "chat_jsonl", "csv_qa", "tsv_qa", "tsv_translation")
# Names from the first draft of the trainer proto ("faq_json", "csv", "tsv_pairs") and
# obvious spellings, so a client using them is not refused for a naming detail.
FORMAT_ALIASES = {
    "faq_json": "alpaca_json",
    "json": "alpaca_json",
    "jsonl": "alpaca_jsonl",
    "chat": "chat_jsonl",
    "sharegpt": "chat_jsonl",
    "csv": "csv_qa",
    "tsv": "tsv_qa",
    "tsv_pairs": "tsv_qa",
    "translation": "tsv_translation",
}
# The first known key wins; unescaped quotes keep keys inside string values out.
_KEY_RE = re.compile(r'(?<!\\)"(messages|conversations|instruction|output|question|answer)"\s*:')


def normalize_format(fmt: str) -> str:
    name = fmt.strip().lower()
    name = FORMAT_ALIASES.get(name, name)
    if name not in FORMATS:
        raise InvalidArgument("format", f"unknown format {clip(fmt)}; expected one of {', '.join(FORMATS)}")
    return name


def detect_format(filename: str, head: bytes, *, translation: bool = False) -> str:
    """Guess the format from the file name's extension and the first bytes of the data.

    ``head`` may end mid-line (the caller passes a prefix), so JSON is sniffed by its keys
    rather than parsed whole. Tab-separated files are Q/A pairs unless ``translation``.
    """
    ext = PurePosixPath(filename.replace("\\", "/")).suffix.lower()
    text = head.decode("utf-8-sig", errors="replace")
    start = text.lstrip()[:1]
    if ext == ".csv":
        return "csv_qa"
    if ext in (".jsonl", ".ndjson"):
        return _sniff_jsonl(text)
    if ext == ".json":
        return _sniff_json(text)
    if ext in (".tsv", ".tab", ".txt"):
        return _sniff_tsv(text, translation)
    # No telling extension: go by the content alone.
    if start == "[":
        return _sniff_json(text)
    if start == "{":
        return _sniff_jsonl(text)
    if "\t" in first_line(text):
        return _sniff_tsv(text, translation)
    raise InvalidArgument(
        "format",
        f"cannot tell the dataset format from the name and content; name it explicitly (one of {', '.join(FORMATS)})",
    )


def first_line(text: str) -> str:
    for line in text.split("\n"):
        if line.strip():
            return line.rstrip("\r")
    return ""


def _sniff_json(text: str) -> str:
    start = text.lstrip()[:1]
    if start == "{":  # JSON Lines saved as .json
        return _sniff_jsonl(text)
    if start != "[":
        raise InvalidArgument("format", "a .json dataset must be a JSON array of objects")
    kind = _json_kind(text)
    if kind == "alpaca":
        return "alpaca_json"
    if kind == "chat":
        raise InvalidArgument(
            "format",
            'chat conversations must be JSON Lines (one {"messages": [...]} per line, '
            "format chat_jsonl), not a JSON array",
        )
    raise InvalidArgument(
        "format",
        "cannot tell the JSON dataset's format: expected objects with "
        "'instruction'/'output' or 'question'/'answer' keys",
    )


def _sniff_jsonl(text: str) -> str:
    line = first_line(text)
    try:
        obj = json.loads(line)
        kind = _keys_kind(obj.keys()) if isinstance(obj, dict) else None
    except (ValueError, RecursionError):  # the prefix cut the first line short
        kind = _json_kind(text)
    if kind == "chat":
        return "chat_jsonl"
    if kind == "alpaca":
        return "alpaca_jsonl"
    raise InvalidArgument(
        "format",
        "cannot tell the JSON Lines dataset's format: expected 'messages'/"
        "'conversations' (chat) or 'instruction'/'question' (alpaca) keys",
    )


def _sniff_tsv(text: str, translation: bool) -> str:
    if "\t" not in first_line(text):
        raise InvalidArgument("format", "a .tsv/.txt dataset must have two tab-separated columns per line")
    return "tsv_translation" if translation else "tsv_qa"


def _json_kind(text: str) -> str | None:
    m = _KEY_RE.search(text)
    return None if m is None else _keys_kind([m.group(1)])


def _keys_kind(keys: Iterable[str]) -> str | None:
    names = set(keys)
    if names & {"messages", "conversations"}:
        return "chat"
    if names & {"instruction", "output", "question", "answer"}:
        return "alpaca"
    return None
