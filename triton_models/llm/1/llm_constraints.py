"""Constrained decoding: a request's response_format → a grammar matcher that masks its logits.

The grammar engine is llguidance (docs/structured-output.md says why, bench/structured.py
measures it against the other candidates). A JSON schema, a regex or "any JSON object" compiles
to a matcher over the model's tokenizer; compiled matchers are cached by (tokenizer, format) in
a bounded LRU and every row decodes with its own deep copy. Choice lists are not decoded: they
are scored exactly (llm_choices), so only their shape is checked here.

Thread use: parse_format / Grammars.matcher run in execute() (Triton's thread), Matcher methods
in the decode thread; each row's matcher is touched by one thread at a time.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch
from llm_errors import RequestError, invalid

FIELD = "response_format_json"
MAX_CHOICES = 64
MAX_CHOICE_CHARS = 256
CACHE_SIZE = 64  # compiled formats kept per process (LRU)
# Compact JSON, no free whitespace: a model cannot wander in blanks and never reach the end.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}


def parse_format(text: str) -> dict[str, Any] | None:
    """The response_format_json input → a checked format dict (None = unconstrained)."""
    if not text:
        return None
    try:
        fmt = json.loads(text)
    except ValueError as exc:
        raise invalid(FIELD, f"bad JSON ({exc})") from None
    if not isinstance(fmt, dict):
        raise invalid(FIELD, "must be a JSON object with a type")
    kind = fmt.get("type")
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), (dict, bool)):
            raise invalid(FIELD, "json_schema needs a schema object")
    elif kind == "choice":
        choices = fmt.get("choices")
        if not isinstance(choices, list) or not choices:
            raise invalid(FIELD, "choice needs a non-empty list of choices")
        if not all(isinstance(c, str) and c for c in choices):
            raise invalid(FIELD, "choices must be non-empty strings")
        if len(choices) > MAX_CHOICES:
            raise invalid(FIELD, f"{len(choices)} choices, the limit is {MAX_CHOICES}")
        if len(set(choices)) != len(choices):
            raise invalid(FIELD, "choices must be unique")
        if any(len(c) > MAX_CHOICE_CHARS for c in choices):
            raise invalid(FIELD, f"a choice is longer than {MAX_CHOICE_CHARS} characters")
    elif kind == "regex":
        if not isinstance(fmt.get("pattern"), str) or not fmt["pattern"]:
            raise invalid(FIELD, "regex needs a non-empty pattern")
    elif kind != "json_object":
        raise invalid(FIELD, f"unknown type {kind!r} (json_schema, choice, regex, json_object)")
    return fmt


def grammar_of(fmt: dict[str, Any]) -> str:
    """llguidance grammar text of a decoded format (not for choice lists)."""
    kind = fmt["type"]
    if kind == "regex":
        return str(llguidance.LLMatcher.grammar_from_regex(fmt["pattern"]))
    schema = fmt["schema"] if kind == "json_schema" else {"type": "object"}
    try:
        return str(llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS))  # type: ignore[arg-type]  # the stub omits the dict form of the options
    except ValueError as exc:
        raise invalid(FIELD, f"bad schema ({exc})") from None


def _first_line(message: str) -> str:
    return (message.strip().splitlines() or ["invalid"])[0][:300]


class Matcher:
    """One row's grammar state: masks its logits, follows its tokens, says if it completed."""

    def __init__(self, ll: Any, vocab_n: int, eos: int) -> None:
        self.ll = ll
        self.vocab_n = vocab_n  # tokens the grammar knows (the tokenizer's); logits may be wider
        self.eos = eos
        self.words = torch.zeros((vocab_n + 31) // 32, dtype=torch.int32)
        self.complete = False  # ended by EOS in an accepting state

    def done(self) -> bool:
        """Nothing but EOS may follow (grammar complete, or broken: then the row is invalid)."""
        return bool(self.ll.is_stopped())

    def allowed(self) -> torch.Tensor:
        """Bool mask [vocab_n] of the tokens the grammar allows next."""
        self.ll.unsafe_compute_mask_ptr(self.words.data_ptr(), self.words.numel() * 4)
        bits = np.unpackbits(self.words.numpy().view(np.uint8), bitorder="little")[: self.vocab_n]
        return torch.from_numpy(bits.view(np.bool_))

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits with every disallowed token at -inf (a new tensor)."""
        allowed = self.allowed()
        n = logits.shape[-1]
        if n > self.vocab_n:  # padding rows of the embedding are never text
            allowed = torch.cat([allowed, torch.zeros(n - self.vocab_n, dtype=torch.bool)])
        return logits.masked_fill(~allowed[:n], float("-inf"))

    def consume(self, tok: int) -> None:
        if tok == self.eos:
            self.complete = bool(self.ll.is_accepting()) and not self.ll.is_error()
        if not self.ll.is_stopped():
            self.ll.consume_token(tok)


class Grammars:
    """Compiled formats for one tokenizer (the LLTokenizer is built once, ~2 s for 49k tokens)."""

    def __init__(self, tokenizer: Any, cache_size: int = CACHE_SIZE) -> None:
        self.tokenizer = tokenizer
        self.cache_size = cache_size
        self.eos = int(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
        self._ll: Any = None
        self._cache: OrderedDict[str, Any] = OrderedDict()  # canonical format → unused matcher
        self._lock = threading.Lock()

    def lltokenizer(self) -> Any:
        with self._lock:
            if self._ll is None:
                self._ll = llguidance.hf.from_tokenizer(self.tokenizer, eos_token=self.eos)
            return self._ll

    def compile(self, fmt: dict[str, Any]) -> Any:
        """The format's pristine matcher (cached); raises RequestError if it does not compile."""
        key = json.dumps(fmt, sort_keys=True, ensure_ascii=False)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        ll = llguidance.LLMatcher(self.lltokenizer(), grammar_of(fmt), log_level=0)
        if ll.is_error():
            what = "schema" if fmt["type"] != "regex" else "regex"
            raise invalid(FIELD, f"bad {what} ({_first_line(ll.get_error())})")
        with self._lock:
            self._cache[key] = ll
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return ll

    def matcher(self, fmt: dict[str, Any]) -> Matcher:
        proto = self.compile(fmt)
        return Matcher(proto.deep_copy(), int(self.lltokenizer().vocab_size), self.eos)


_registry: dict[int, Grammars] = {}
_registry_lock = threading.Lock()


def grammars_for(tokenizer: Any) -> Grammars:
    """The Grammars of a tokenizer object (one per loaded model)."""
    with _registry_lock:
        g = _registry.get(id(tokenizer))
        if g is None or g.tokenizer is not tokenizer:
            g = _registry[id(tokenizer)] = Grammars(tokenizer)
        return g


def prepare(fmt: dict[str, Any] | None, tokenizer: Any) -> Matcher | None:
    """The row's matcher (None: unconstrained or a choice list, which is scored instead)."""
    if fmt is None or fmt["type"] == "choice":
        return None
    try:
        return grammars_for(tokenizer).matcher(fmt)
    except RequestError:
        raise
    except Exception as exc:  # the engine's own refusal of a format is the caller's input
        raise invalid(FIELD, f"cannot compile ({_first_line(str(exc))})") from None


def verdict(finish: str | None, matcher: Matcher | None) -> str:
    """structured_json of a decoded row: valid iff it ended with STOP and the grammar completed."""
    valid = finish == "stop" and matcher is not None and matcher.complete
    return json.dumps({"valid": valid})
