"""The trainer's dataset layer: client files in, normalized chat examples out.

Every accepted format (alpaca JSON/JSONL, chat JSONL in OpenAI or ShareGPT shape, CSV
question/answer, tab-separated Q/A or translation pairs) becomes a list of `Example`s: an
optional system message, then user/assistant turns ending with the assistant message that
is the training target. Parsing never stops at the first bad row: it collects a
`RowError` per row so the client can fix the whole file in one go, and `validate` turns
them into one INVALID_ARGUMENT. The stored form is JSONL of ``{"messages": [...]}``
(`to_jsonl` / `from_jsonl`), and `content_hash` is the sha256 of exactly those bytes.

Modules: `examples` (the normalized types), `formats` (names and detection), `parsing`
(the whole file, with `json_rows` and `table_rows` reading the rows of each format),
`splitting` (train/eval), `stored_form` (JSONL and hash). Which files a client may name
is the shared runtime's `llmesh.runtime.paths`. Stdlib only: services stay light.
"""

from __future__ import annotations

from llmesh.services.trainer.datasets.examples import Example, Message, ParsedDataset, RowError
from llmesh.services.trainer.datasets.formats import FORMAT_ALIASES, FORMATS, detect_format, normalize_format
from llmesh.services.trainer.datasets.parsing import parse, validate
from llmesh.services.trainer.datasets.splitting import split
from llmesh.services.trainer.datasets.stored_form import content_hash, from_jsonl, to_jsonl
from llmesh.services.trainer.datasets.table_rows import Languages

__all__ = [
    "FORMATS",
    "FORMAT_ALIASES",
    "Example",
    "Languages",
    "Message",
    "ParsedDataset",
    "RowError",
    "content_hash",
    "detect_format",
    "from_jsonl",
    "normalize_format",
    "parse",
    "split",
    "to_jsonl",
    "validate",
]
