"""The trainer's dataset layer: client files in, normalized chat examples out.

Every accepted format (alpaca JSON/JSONL, chat JSONL in OpenAI or ShareGPT shape, CSV
question/answer, tab-separated Q/A or translation pairs) becomes a list of `Example`s: an
optional system message, then user/assistant turns ending with the assistant message that
is the training target. Parsing never stops at the first bad row: it collects a
`RowError` per row so the client can fix the whole file in one go, and `validate` turns
them into one INVALID_ARGUMENT. The stored form is JSONL of ``{"messages": [...]}``
(`to_jsonl` / `from_jsonl`), and `content_hash` is the sha256 of exactly those bytes.

Stdlib only: the service imports this, and services stay light.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from llmesh.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied

__all__ = [
    "FORMATS",
    "FORMAT_ALIASES",
    "Example",
    "Message",
    "ParsedDataset",
    "RowError",
    "content_hash",
    "detect_format",
    "from_jsonl",
    "normalize_format",
    "parse",
    "resolve_within",
    "split",
    "to_jsonl",
    "validate",
]

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
ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# CSV header pairs, in priority order; matched case-insensitively after stripping.
_CSV_COLUMNS = (
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
_TSV_HEADERS = {
    ("question", "answer"),
    ("q", "a"),
    ("prompt", "response"),
    ("问题", "答案"),
    ("问题", "回答"),
    ("source", "target"),
    ("src", "tgt"),
    ("原文", "译文"),
}
_CLIP = 60  # longest piece of client data echoed back in an error reason


# --------------------------------------------------------------------------- types


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {self.role!r}")


@dataclass(frozen=True)
class Example:
    """Optional system, then user/assistant turns; the last assistant message is the target."""

    messages: tuple[Message, ...]

    def __post_init__(self) -> None:
        problem = _turn_problem([m.role for m in self.messages])
        if problem is not None:
            raise ValueError(f"message {problem[0]}: {problem[1]}")

    @property
    def target(self) -> str:
        return self.messages[-1].content

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in self.messages]


@dataclass(frozen=True)
class RowError:
    row: int  # 1-based line (JSONL/CSV/TSV) or array index + 1 (JSON); 0 = the whole file
    reason: str


@dataclass
class ParsedDataset:
    format: str
    examples: list[Example]
    errors: list[RowError]
    duplicates: int  # exact duplicate examples dropped, the first one kept


class _RowProblem(Exception):
    """One row is unusable; the message is the reason reported for it."""


# --------------------------------------------------------------------------- format detection


def normalize_format(fmt: str) -> str:
    name = fmt.strip().lower()
    name = FORMAT_ALIASES.get(name, name)
    if name not in FORMATS:
        raise InvalidArgument("format", f"unknown format {_clip(fmt)}; expected one of {', '.join(FORMATS)}")
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
    if "\t" in _first_line(text):
        return _sniff_tsv(text, translation)
    raise InvalidArgument(
        "format",
        f"cannot tell the dataset format from the name and content; name it explicitly (one of {', '.join(FORMATS)})",
    )


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
    line = _first_line(text)
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
    if "\t" not in _first_line(text):
        raise InvalidArgument("format", "a .tsv/.txt dataset must have two tab-separated columns per line")
    return "tsv_translation" if translation else "tsv_qa"


_KEY_RE = re.compile(r'(?<!\\)"(messages|conversations|instruction|output|question|answer)"\s*:')


def _json_kind(text: str) -> str | None:
    # The first known key wins; unescaped quotes keep keys inside string values out.
    m = _KEY_RE.search(text)
    return None if m is None else _keys_kind([m.group(1)])


def _keys_kind(keys: Iterable[str]) -> str | None:
    keys = set(keys)
    if keys & {"messages", "conversations"}:
        return "chat"
    if keys & {"instruction", "output", "question", "answer"}:
        return "alpaca"
    return None


def _first_line(text: str) -> str:
    for line in text.split("\n"):
        if line.strip():
            return line.rstrip("\r")
    return ""


# --------------------------------------------------------------------------- parsing

# A row parser yields (row number, Example or the reason the row is bad).
Rows = Iterator[tuple[int, "Example | str"]]
Builder = Callable[[dict[str, Any]], "Example"]  # one JSON object -> Example, or _RowProblem


def parse(data: bytes, fmt: str, *, source_lang: str = "中文", target_lang: str = "英文") -> ParsedDataset:
    """Parse a whole dataset file; bad rows become `RowError`s, duplicates are dropped."""
    fmt = normalize_format(fmt)
    try:
        text = data.decode("utf-8-sig")  # Excel and Notepad write a BOM
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return ParsedDataset(fmt, [], [RowError(0, f"invalid UTF-8 at byte {e.start} (line {line})")], 0)
    if fmt == "alpaca_json":
        rows = _json_array_rows(text, _alpaca_example)
    elif fmt == "alpaca_jsonl":
        rows = _jsonl_rows(text, _alpaca_example)
    elif fmt == "chat_jsonl":
        rows = _jsonl_rows(text, _chat_example)
    elif fmt == "csv_qa":
        rows = _csv_rows(text)
    else:
        rows = _tsv_rows(text, translate=(source_lang, target_lang) if fmt == "tsv_translation" else None)
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


def _json_array_rows(text: str, build: Builder) -> Rows:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        yield 0, f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        return
    except RecursionError:
        yield 0, "invalid JSON: nested too deeply"
        return
    if not isinstance(doc, list):
        yield 0, f"expected a JSON array of objects, got {_type_name(doc)}"
        return
    for i, obj in enumerate(doc, start=1):
        yield i, _build(build, obj)


def _jsonl_rows(text: str, build: Builder) -> Rows:
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends unescaped.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, f"invalid JSON: {e.msg} at column {e.colno}"
            continue
        except RecursionError:
            yield lineno, "invalid JSON: nested too deeply"
            continue
        yield lineno, _build(build, obj)


def _build(build: Builder, obj: Any) -> Example | str:
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {_type_name(obj)}"
    try:
        return build(obj)
    except _RowProblem as e:
        return str(e)


def _alpaca_example(obj: dict[str, Any]) -> Example:
    """alpaca {instruction, input?, output, system?, history?}, or FAQ {question, answer}."""
    if "instruction" not in obj and "output" not in obj and ("question" in obj or "answer" in obj):
        return _example(None, [], _text(obj, "question"), _text(obj, "answer"))
    user = _text(obj, "instruction")
    extra = _text(obj, "input", required=False)
    if extra:  # the alpaca convention: the input is context for the instruction
        user = f"{user}\n{extra}"
    history = []
    raw = obj.get("history")
    if raw is not None:
        if not isinstance(raw, list):
            raise _RowProblem(f"'history' must be an array of [user, assistant] pairs, got {_type_name(raw)}")
        for i, pair in enumerate(raw):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise _RowProblem(f"history[{i}] must be a [user, assistant] pair")
            history.append((_pair_text(pair[0], f"history[{i}][0]"), _pair_text(pair[1], f"history[{i}][1]")))
    return _example(_text(obj, "system", required=False) or None, history, user, _text(obj, "output"))


def _chat_example(obj: dict[str, Any]) -> Example:
    """OpenAI {"messages": [{role, content}]} or ShareGPT {"conversations": [{from, value}]}."""
    if "messages" in obj:
        key, role_key, text_key, roles = "messages", "role", "content", {r: r for r in ROLES}
    elif "conversations" in obj:
        key, role_key, text_key, roles = "conversations", "from", "value", _SHAREGPT_ROLES
    else:
        raise _RowProblem("expected a 'messages' or 'conversations' array")
    turns = obj[key]
    if not isinstance(turns, list):
        raise _RowProblem(f"'{key}' must be an array, got {_type_name(turns)}")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise _RowProblem(f"{where} must be an object, got {_type_name(turn)}")
        role = turn.get(role_key)
        if role is None:
            raise _RowProblem(f"missing {where}.{role_key}")
        if not isinstance(role, str) or role.strip().lower() not in roles:
            raise _RowProblem(f"{where}.{role_key} must be one of {', '.join(roles)}, got {_clip(role)}")
        messages.append(Message(roles[role.strip().lower()], _text(turn, text_key, where=where)))
    problem = _turn_problem([m.role for m in messages])
    if problem is not None:
        raise _RowProblem(f"{key}[{problem[0]}]: {problem[1]}" if problem[0] >= 0 else problem[1])
    return Example(tuple(messages))


def _csv_rows(text: str) -> Rows:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
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
        pairs = ", ".join(f"{q}/{a}" for q, a in _CSV_COLUMNS)
        got = _clip(",".join(names))
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
                _qa_example(
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
    for q, a in _CSV_COLUMNS:
        if q in names and a in names:
            # alpaca exported to CSV keeps its optional 'input' column
            extra = names.index("input") if q == "instruction" and "input" in names else None
            return names.index(q), names.index(a), extra
    return None


def _tsv_rows(text: str, translate: tuple[str, str] | None) -> Rows:
    first = True
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        cols = line.split("\t")
        if first:
            first = False
            if tuple(c.strip().lower() for c in cols) in _TSV_HEADERS:
                continue
        if len(cols) != 2:
            yield lineno, f"expected 2 tab-separated columns, got {len(cols)}"
        elif translate is None:
            yield lineno, _qa_example(cols[0], cols[1], "question", "answer")
        else:
            yield lineno, _translation_example(cols[0], cols[1], *translate)


def _qa_example(question: str, answer: str, q_name: str, a_name: str, *, extra: str = "") -> Example | str:
    q, a = question.strip(), answer.strip()
    if not q:
        return f"empty '{q_name}'"
    if not a:
        return f"empty '{a_name}'"
    if extra.strip():
        q = f"{q}\n{extra.strip()}"
    return _example(None, [], q, a)


def _translation_example(src: str, tgt: str, source_lang: str, target_lang: str) -> Example | str:
    src, tgt = src.strip(), tgt.strip()
    if not src:
        return "empty source text"
    if not tgt:
        return "empty target text"
    # Same wording as the inference service's translation template, so the adapter learns it.
    return _example(None, [], f"将以下{source_lang}文本翻译成{target_lang}：\n{src}", tgt)


def _example(system: str | None, history: list[tuple[str, str]], user: str, assistant: str) -> Example:
    messages = [Message("system", system)] if system else []
    for u, a in history:
        messages += [Message("user", u), Message("assistant", a)]
    messages += [Message("user", user), Message("assistant", assistant)]
    return Example(tuple(messages))


def _turn_problem(roles: list[str]) -> tuple[int, str] | None:
    """Where the role order breaks: (index or -1 for the whole, reason), or None."""
    body = roles[1:] if roles[:1] == ["system"] else roles
    offset = len(roles) - len(body)
    if not body:
        return -1, "needs at least one user message and one assistant reply"
    for i, role in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            where = "system may only come first" if role == "system" else f"expected '{want}', got '{role}'"
            return i + offset, f"wrong role order: {where}"
    if body[-1] != "assistant":
        return -1, "the conversation must end with an assistant message"
    return None


def _text(obj: dict[str, Any], key: str, *, required: bool = True, where: str = "") -> str:
    """A stripped string field; missing/null is fine only when not required."""
    name = f"{where}.{key}" if where else f"'{key}'"
    value = obj.get(key)
    if value is None:
        if required:
            raise _RowProblem(f"missing {name}")
        return ""
    if not isinstance(value, str):
        raise _RowProblem(f"{name} must be a string, got {_type_name(value)}")
    value = value.strip()
    if required and not value:
        raise _RowProblem(f"empty {name}")
    return value


def _pair_text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise _RowProblem(f"{name} must be a string, got {_type_name(value)}")
    if not value.strip():
        raise _RowProblem(f"empty {name}")
    return value.strip()


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return "string" if isinstance(value, str) else type(value).__name__


def _clip(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _CLIP else text[: _CLIP - 3] + "..."


# --------------------------------------------------------------------------- checks, split, hash


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


def split(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval): a seeded shuffle, then the first round(n * fraction) go to eval."""
    if not (isinstance(eval_fraction, (int, float)) and math.isfinite(eval_fraction) and 0 <= eval_fraction <= 0.5):
        raise InvalidArgument("eval_fraction", f"must be between 0 and 0.5, got {eval_fraction}")
    n = len(examples)
    order = list(range(n))
    random.Random(seed).shuffle(order)  # Random(int) + shuffle are stable across runs and versions
    k = 0
    if eval_fraction > 0 and n >= 2:
        k = min(max(1, round(n * eval_fraction)), n - 1)  # eval is never empty, train never is
    return [examples[i] for i in order[k:]], [examples[i] for i in order[:k]]


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
    for row, item in _jsonl_rows(text, _chat_example):
        if not isinstance(item, Example):
            raise FailedPrecondition(f"stored dataset is corrupt: line {row}: {item}")
        examples.append(item)
    return examples


# --------------------------------------------------------------------------- client paths


def resolve_within(root: Path, user_path: str) -> Path:
    """The real path of a file a client names, which must lie inside ``root``.

    Checked on the fully resolved path, so a symlink anywhere in it (file or directory)
    that leads outside is refused. Containment is checked before existence, so a client
    cannot probe which files exist outside the root. Messages quote only the client's own
    input, never the root or where a link points.
    """
    if not user_path or "\x00" in user_path:
        raise InvalidArgument("path", "must be a non-empty path without NUL characters")
    shown = user_path if len(user_path) <= 200 else user_path[:197] + "..."
    try:
        real_root = Path(root).resolve(strict=True)
    except OSError:
        raise FailedPrecondition("the dataset root is not available on the server") from None
    given = Path(user_path)
    # '..' is never needed to name a file under the root; refusing it outright leaves no
    # lexical trick to reason about.
    if ".." in given.parts:
        raise PermissionDenied(f"dataset path '{shown}' must not contain '..'")
    candidate = given if given.is_absolute() else real_root / given
    try:
        real = candidate.resolve(strict=False)
    except (OSError, RuntimeError):  # a symlink loop
        raise PermissionDenied(f"dataset path '{shown}' cannot be resolved") from None
    if real != real_root and not real.is_relative_to(real_root):
        raise PermissionDenied(f"dataset path '{shown}' is outside the allowed dataset root")
    if not real.exists():
        raise NotFound("dataset file", user_path)
    if not real.is_file():
        raise InvalidArgument("path", f"'{shown}' is not a regular file")
    if not os.access(real, os.R_OK):
        raise PermissionDenied(f"dataset path '{shown}' is not readable by the trainer")
    return real
