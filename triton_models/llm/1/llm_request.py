"""One request: its decoding state (Row) and the parsing/validation of its input tensors.

Inputs (all optional, dims [1] plus the batch dim; exactly one of prompt / messages_json):
  prompt STRING | messages_json STRING (JSON [{"role","content"}], chat template applied with
  add_generation_prompt=True) | max_tokens INT32 (64) | temperature FP32 (1.0, 0 = greedy) |
  top_p FP32 (1.0) | top_k INT32 (0 = off) | repetition_penalty FP32 (1.0) | seed INT64
  (absent or < 0 = random) | stop_json STRING (JSON list of stop strings) | adapter STRING
  ("" = base model) | stream BOOL (false) | raw BOOL (false: a prompt is wrapped as one user
  turn in the tokenizer's chat template when it has one; true: tokenized as is) |
  response_format_json STRING ("" = unconstrained; see llm_constraints.parse_format: a JSON
  schema, a choice list, a regex or any JSON object; a constrained row ignores stop strings,
  it ends when its grammar does)
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from llm_constraints import parse_format, prepare
from llm_errors import invalid

ADAPTER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")


class Row:
    """Per-request decoding state (one instance per request)."""

    def __init__(self, request: Any) -> None:
        self.request = request
        self.sender = request.get_response_sender()
        self.prompt_ids: list[int] = []
        self.prompt_text = ""  # the text prompt_ids were tokenized from (choice scoring extends it)
        self.source = "prompt"  # the input the prompt came from, named in errors
        self.max_tokens = 64
        self.temperature = 1.0
        self.top_p = 1.0
        self.top_k = 0
        self.repetition_penalty = 1.0
        self.seed: int | None = None
        self.stops: list[str] = []
        self.adapter = ""
        self.stream = False
        self.raw_prompt = False  # input "raw": no chat template around a prompt
        self.response_format: dict[str, Any] | None = None  # parsed response_format_json
        self.constraint: Any = None  # the row's grammar matcher while decoding (llm_constraints)
        self.structured = ""  # structured_json of the FINAL response ("" = unconstrained)
        self.generator: torch.Generator | None = None
        self.generated: list[int] = []
        self.raw = bytearray()  # bytes of the generated text (special tokens excluded)
        self.emitted = ""  # text already streamed
        self.delta_at = 0.0  # monotonic time of the last streamed delta (llm_responses pacing)
        self.text = ""  # final text
        self.finish: str | None = None  # set when the row is done
        self.finalized = False  # FINAL response sent
        self.seen: torch.Tensor | None = None  # token ids for the repetition penalty

    def cancelled(self) -> bool:
        """Whether the client gave up (deadline, disconnect); asked of the request, then the sender."""
        try:
            return bool(self.request.is_cancelled())
        except Exception:
            pass
        try:
            return bool(self.sender.is_cancelled())
        except Exception:
            return False


def _scalar(request: Any, name: str) -> Any:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    arr = tensor.as_numpy()
    if arr.size != 1:
        raise invalid(name, f"expected one value, got shape {list(arr.shape)}")
    return arr.reshape(-1)[0]


def _string(request: Any, name: str) -> str | None:
    value = _scalar(request, name)
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise invalid(name, "not valid UTF-8") from None
    return str(value)


def _chat(tokenizer: Any, messages: list[dict[str, str]], field: str) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # template errors are the caller's input
        raise invalid(field, f"chat template failed ({exc})") from None
    return str(text)


def _prompt_text(request: Any, tokenizer: Any, raw: bool) -> tuple[str, str]:
    """(text, the input it came from): the prompt as given (raw), as one user turn of the chat
    template (an instruct model answers it instead of ending at once), or the messages."""
    prompt = _string(request, "prompt")
    messages_json = _string(request, "messages_json")
    if (prompt is None) == (messages_json is None):
        raise invalid("prompt", "exactly one of prompt or messages_json is required")
    if messages_json is None:
        if raw or not prompt or not getattr(tokenizer, "chat_template", None):
            return prompt or "", "prompt"
        return _chat(tokenizer, [{"role": "user", "content": prompt}], "prompt"), "prompt"
    try:
        messages = json.loads(messages_json)
    except ValueError as exc:
        raise invalid("messages_json", f"bad JSON ({exc})") from None
    if not isinstance(messages, list) or not messages:
        raise invalid("messages_json", "must be a non-empty JSON list")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise invalid("messages_json", 'each item needs string "role" and "content"')
    text = _chat(tokenizer, [{"role": m["role"], "content": m["content"]} for m in messages], "messages_json")
    return text, "messages_json"


def parse(row: Row, tokenizer: Any, max_positions: int) -> None:
    """Fill `row` from its request's inputs; raises RequestError naming the bad input."""
    req = row.request
    v = _scalar(req, "raw")
    row.raw_prompt = bool(v) if v is not None else False
    text, row.source = _prompt_text(req, tokenizer, row.raw_prompt)
    row.prompt_text = text
    row.prompt_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not row.prompt_ids:
        raise invalid("prompt", "empty prompt")

    v = _scalar(req, "max_tokens")
    row.max_tokens = 64 if v is None else int(v)
    if row.max_tokens < 1:
        raise invalid("max_tokens", "must be >= 1")
    if len(row.prompt_ids) >= max_positions:
        raise invalid(row.source, f"{len(row.prompt_ids)} tokens, the model's context is {max_positions}")
    if len(row.prompt_ids) + row.max_tokens > max_positions:
        raise invalid(
            "max_tokens",
            f"prompt tokens ({len(row.prompt_ids)}) + max_tokens ({row.max_tokens}) "
            f"exceeds the context of {max_positions}",
        )
    v = _scalar(req, "temperature")
    row.temperature = 1.0 if v is None else float(v)
    if not np.isfinite(row.temperature) or row.temperature < 0:
        raise invalid("temperature", "must be >= 0")
    v = _scalar(req, "top_p")
    row.top_p = 1.0 if v is None else float(v)
    if not np.isfinite(row.top_p) or not 0 < row.top_p <= 1:
        raise invalid("top_p", "must be in (0, 1]")
    v = _scalar(req, "top_k")
    row.top_k = 0 if v is None else int(v)
    if row.top_k < 0:
        raise invalid("top_k", "must be >= 0")
    v = _scalar(req, "repetition_penalty")
    row.repetition_penalty = 1.0 if v is None else float(v)
    if not np.isfinite(row.repetition_penalty) or row.repetition_penalty <= 0:
        raise invalid("repetition_penalty", "must be > 0")
    v = _scalar(req, "seed")
    row.seed = None if v is None or int(v) < 0 else int(v)  # negative = random
    stop_json = _string(req, "stop_json")
    if stop_json:
        try:
            stops = json.loads(stop_json)
        except ValueError as exc:
            raise invalid("stop_json", f"bad JSON ({exc})") from None
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise invalid("stop_json", "must be a JSON list of strings")
        row.stops = [s for s in stops if s]
    adapter = _string(req, "adapter") or ""
    if adapter and not ADAPTER_RE.match(adapter):
        raise invalid("adapter", f"invalid adapter name {adapter!r}")
    row.adapter = adapter
    v = _scalar(req, "stream")
    row.stream = bool(v) if v is not None else False
    row.response_format = parse_format(_string(req, "response_format_json") or "")
    row.constraint = prepare(row.response_format, tokenizer)
    if row.response_format is not None:
        row.stops = []  # a stop string would cut a structured output short of its grammar

    gen = torch.Generator()
    if row.seed is None:
        gen.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    else:
        gen.manual_seed(row.seed & 0xFFFFFFFFFFFFFFFF)
    row.generator = gen
