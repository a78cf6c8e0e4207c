"""Row readers for the tabular formats: CSV with a question/answer header, and
tab-separated Q/A or translation pairs."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from llmesh.services.trainer.datasets.examples import Example, build_example
from llmesh.services.trainer.datasets.rows import Rows, clip

# CSV header pairs, in priority order; matched case-insensitively after stripping.
CSV_COLUMNS = (
    ("question", "answer"),
    ("q", "a"),
    ("instruction", "output"),
    ("prompt", "response"),
    ("prompt", "completion"),
    ("input", "output"),
    ("问题", "答案"),
    ("问题", "回答"),
)
# A first TSV line made of these is a header, not a pair.
TSV_HEADERS = {
    ("question", "answer"),
    ("q", "a"),
    ("prompt", "response"),
    ("问题", "答案"),
    ("问题", "回答"),
    ("source", "target"),
    ("src", "tgt"),
    ("原文", "译文"),
}


@dataclass(frozen=True)
class Languages:
    """What a translation pair translates from and into, as words of the prompt (e.g. "中文")."""

    source: str
    target: str


def csv_rows(data: str) -> Rows:
    reader = csv.reader(io.StringIO(data, newline=""), strict=True)
    records = _csv_records(reader)
    header = next(records, None)
    while header is not None and header[1] == []:  # blank lines before the header
        header = next(records, None)
    if header is None:  # no rows at all: validate() reports the empty dataset
        return
    header_row, first = header
    if isinstance(first, str):  # the header itself is malformed
        yield header_row, first
        return
    names = [h.strip().lower() for h in first]
    cols = _csv_columns(names)
    if cols is None:
        pairs = ", ".join(f"{q}/{a}" for q, a in CSV_COLUMNS)
        got = clip(",".join(names))
        yield header_row, f"the header must name a question and an answer column ({pairs}); got {got}"
        return
    q_col, a_col, input_col = cols
    width = len(names)
    for row, record in records:
        if isinstance(record, str):
            yield row, record
        elif not record:  # a blank line
            continue
        elif len(record) != width:
            yield row, f"expected {width} columns, got {len(record)}"
        else:
            yield (
                row,
                qa_example(
                    record[q_col],
                    record[a_col],
                    names[q_col],
                    names[a_col],
                    extra=record[input_col] if input_col is not None else "",
                ),
            )


def _csv_records(reader: Any) -> Iterator[tuple[int, list[str] | str]]:
    # A record may span lines (quoted newlines): its row is the line it starts on.
    it = iter(reader)
    start = 1
    while True:
        try:
            record: list[str] | str = next(it)
        except StopIteration:
            return
        except csv.Error as e:  # strict mode: a stray quote, an unterminated field
            record = f"malformed CSV: {e}"
        yield start, record
        start = reader.line_num + 1


def _csv_columns(names: list[str]) -> tuple[int, int, int | None] | None:
    for q, a in CSV_COLUMNS:
        if q in names and a in names:
            # alpaca exported to CSV keeps its optional 'input' column
            extra = names.index("input") if q == "instruction" and "input" in names else None
            return names.index(q), names.index(a), extra
    return None


def tsv_rows(data: str, translate: Languages | None) -> Rows:
    """Q/A pairs, or translation pairs when ``translate`` names the languages."""
    first = True
    for lineno, raw in enumerate(data.split("\n"), start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        cols = line.split("\t")
        if first:
            first = False
            if tuple(c.strip().lower() for c in cols) in TSV_HEADERS:
                continue
        if len(cols) != 2:
            yield lineno, f"expected 2 tab-separated columns, got {len(cols)}"
        elif translate is None:
            yield lineno, qa_example(cols[0], cols[1], "question", "answer")
        else:
            yield lineno, translation_example(cols[0], cols[1], translate)


def qa_example(question: str, answer: str, q_name: str, a_name: str, *, extra: str = "") -> Example | str:
    q, a = question.strip(), answer.strip()
    if not q:
        return f"empty '{q_name}'"
    if not a:
        return f"empty '{a_name}'"
    if extra.strip():
        q = f"{q}\n{extra.strip()}"
    return build_example(None, [], q, a)


def translation_example(src: str, tgt: str, languages: Languages) -> Example | str:
    src, tgt = src.strip(), tgt.strip()
    if not src:
        return "empty source text"
    if not tgt:
        return "empty target text"
    # Same wording as the inference service's translation template, so the adapter learns it.
    return build_example(None, [], f"将以下{languages.source}文本翻译成{languages.target}：\n{src}", tgt)
