"""A whole dataset file in, a `ParsedDataset` out: every bad row reported, exact
duplicates dropped; `validate` turns the row errors into one INVALID_ARGUMENT."""

from __future__ import annotations

from llmesh.runtime.errors import InvalidArgument
from llmesh.services.trainer.datasets.examples import Example, ParsedDataset, RowError
from llmesh.services.trainer.datasets.formats import normalize_format
from llmesh.services.trainer.datasets.json_rows import alpaca_example, chat_example, json_array_rows, jsonl_rows
from llmesh.services.trainer.datasets.rows import Rows
from llmesh.services.trainer.datasets.table_rows import Languages, csv_rows, tsv_rows


def parse(data: bytes, fmt: str, *, languages: Languages | None = None) -> ParsedDataset:
    """Parse a whole dataset file; bad rows become `RowError`s, duplicates are dropped.

    ``languages`` is required for ``tsv_translation`` (the caller decides them: the server
    takes them from its settings), unused otherwise.
    """
    fmt = normalize_format(fmt)
    if fmt == "tsv_translation" and languages is None:
        raise ValueError("tsv_translation needs the source and target languages")
    try:
        text = data.decode("utf-8-sig")  # Excel and Notepad write a BOM
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return ParsedDataset(fmt, [], [RowError(0, f"invalid UTF-8 at byte {e.start} (line {line})")], 0)
    rows: Rows
    if fmt == "alpaca_json":
        rows = json_array_rows(text, alpaca_example)
    elif fmt == "alpaca_jsonl":
        rows = jsonl_rows(text, alpaca_example)
    elif fmt == "chat_jsonl":
        rows = jsonl_rows(text, chat_example)
    elif fmt == "csv_qa":
        rows = csv_rows(text)
    else:
        rows = tsv_rows(text, translate=languages if fmt == "tsv_translation" else None)
    examples: list[Example] = []
    errors: list[RowError] = []
    for row, item in rows:
        if isinstance(item, Example):
            examples.append(item)
        else:
            errors.append(RowError(row, item))
    unique = _dedup(examples)
    return ParsedDataset(fmt, unique, errors, len(examples) - len(unique))


def _dedup(examples: list[Example]) -> list[Example]:
    # Examples are frozen and hashable: one set makes this linear.
    seen: set[Example] = set()
    out = []
    for ex in examples:
        if ex not in seen:
            seen.add(ex)
            out.append(ex)
    return out


def validate(parsed: ParsedDataset, *, max_errors_reported: int = 20) -> None:
    """One INVALID_ARGUMENT for the whole file: the first bad rows, then a count of the rest."""
    if parsed.errors:
        shown = parsed.errors[: max(1, max_errors_reported)]
        reason = "; ".join(f"row {e.row}: {e.reason}" if e.row else f"file: {e.reason}" for e in shown)
        if len(parsed.errors) > len(shown):
            reason += f" (and {len(parsed.errors) - len(shown)} more)"
        raise InvalidArgument("dataset", reason)
    if not parsed.examples:
        raise InvalidArgument("dataset", "empty dataset: no examples")
