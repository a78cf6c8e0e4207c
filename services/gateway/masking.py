"""PII masking for sensitive fields, before they are forwarded to an LLM.

The entities, patterns, validators and default operators are the shared rule set
(``llmesh.auth.pii``, also what the security service publishes); this module is the
enforcement: candidates are proposed by each entity's regex and decided by its
validator, overlaps are resolved longest-first (an ID number is never split into a
"phone" and leftovers), and each finding is rendered per its operator. Pure Python, no
network, no ML.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from llmesh.auth import pii
from llmesh.auth.pii import Operator, Span, compact

__all__ = ["DEFAULT_OPERATORS", "Finding", "Masker", "Operator", "Rule", "Vault"]


@dataclass(frozen=True)
class Finding:
    entity: str
    start: int
    end: int
    value: str = field(repr=False)  # raw PII: keep it out of logs and tracebacks


@dataclass(frozen=True)
class Rule:
    """An operator-defined entity: ``name`` (lower snake case) is its entity name."""

    name: str
    pattern: str
    operator: Operator


DEFAULT_OPERATORS: Mapping[str, Operator] = {e.name: e.operator for e in pii.ENTITIES}
_ALIASES = {"ip": ("ipv4", "ipv6")}  # operators may configure both IP families at once
_TAGS = {e.name: e.label for e in pii.ENTITIES}
# What gateway.masking may name: the built-in entities and the aliases above.
CONFIGURABLE_ENTITIES = frozenset(DEFAULT_OPERATORS) | frozenset(_ALIASES)


# ---------------------------------------------------------------- mask renderers
def _keep(value: str, head: int, tail: int) -> str:
    """Star the alphanumerics except the first ``head`` and last ``tail``; separators stay."""
    total = sum(c.isalnum() for c in value)
    out, i = [], 0
    for c in value:
        if c.isalnum():
            c = c if i < head or i >= total - tail else "*"
            i += 1
        out.append(c)
    return "".join(out)


def _mask_mobile(value: str) -> str:
    # Keep any country prefix and the 3-digit carrier prefix, plus the last 4.
    return _keep(value, sum(c.isalnum() for c in value) - 8, 4)


def _mask_email(value: str) -> str:
    local, domain = value.split("@", 1)
    return f"{local[0]}***@{domain}"  # fixed-width stars: do not leak the name's length


def _mask_ipv4(value: str) -> str:
    a, b, _, _ = value.split(".")
    return f"{a}.{b}.*.*"


def _mask_ipv6(value: str) -> str:
    hextets = ipaddress.IPv6Address(value).exploded.split(":")
    return ":".join([format(int(h, 16), "x") for h in hextets[:2]] + ["*"] * 6)


def _mask_generic(value: str) -> str:
    n = sum(c.isalnum() for c in value)
    return _keep(value, 1, 1) if n >= 4 else _keep(value, 0, 0)


_MASKERS: dict[str, Callable[[str], str]] = {
    "cn_mobile": _mask_mobile,
    "cn_id": lambda v: _keep(v, 6, 4),
    "bank_card": lambda v: _keep(v, 0, 4),
    "email": _mask_email,
    "ipv4": _mask_ipv4,
    "ipv6": _mask_ipv6,
}


def _label(entity: str) -> str:
    return entity.upper()


def _canonical(entity: str, value: str) -> str:
    """One spelling per real value, so "+86 138-1234-8000" and "13812348000" hash/pseudonymize alike."""
    if entity == "cn_mobile":
        return compact(value)[-11:]
    if entity in ("cn_id", "bank_card"):
        return compact(value)
    if entity == "email":
        return value.lower()
    if entity in ("ipv4", "ipv6"):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            return value
    return value


# ---------------------------------------------------------------- vault
_PLACEHOLDER = re.compile(r"<\s*([A-Za-z][A-Za-z0-9_]*_[0-9]+)\s*>")  # LLMs add spaces / change case
_PARTIAL = re.compile(r"<\s*[A-Za-z0-9_]*\s*")  # an unfinished placeholder at the end of a delta
_LONGEST_PARTIAL = 48


class Vault:
    """Reversible placeholder <-> value map for one request or conversation.

    Not thread-safe: give each request (or chat session) its own vault.
    """

    def __init__(self) -> None:
        self._by_value: dict[tuple[str, str], str] = {}
        self._values: dict[str, str] = {}
        self._counts: Counter[str] = Counter()

    def placeholder(self, entity: str, value: str) -> str:
        tag = _TAGS.get(entity) or _label(entity)
        key = (tag, _canonical(entity, value))
        ph = self._by_value.get(key)
        if ph is None:
            self._counts[tag] += 1
            ph = f"<{tag}_{self._counts[tag]}>"
            self._by_value[key] = ph
            self._values[ph] = value
        return ph

    def restore(self, text: str) -> str:
        """Put the values back; unknown placeholders stay as they are. Single pass, so a
        restored value that looks like a placeholder is never expanded again."""
        if not self._values or "<" not in text:
            return text
        return _PLACEHOLDER.sub(lambda m: self._values.get(f"<{m.group(1).upper()}>", m.group()), text)

    def partial_tail(self, text: str) -> int:
        """Where ``text`` ends in what may be the start of one of this vault's
        placeholders (``"... <PHO"``), else ``len(text)``: a streamed delta is cut there
        and the rest waits for the next delta."""
        i = text.rfind("<")
        if i < 0 or len(text) - i > _LONGEST_PARTIAL:
            return len(text)
        frag = text[i:]
        if not _PARTIAL.fullmatch(frag):
            return len(text)
        squeezed = "".join(frag.split()).upper()
        return i if any(ph.startswith(squeezed) for ph in self._values) else len(text)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Vault({len(self)} values)"  # never the values themselves


# ---------------------------------------------------------------- detection
@dataclass(frozen=True)
class _Detector:
    entity: str
    regex: re.Pattern[str]
    validate: Callable[[re.Match[str]], Span | None]
    rank: int  # equal-length overlap: lower rank wins (validated built-ins before rules)
    trigger: str = ""  # cheap substring test that lets the regex be skipped entirely

    def scan(self, text: str) -> Iterator[tuple[int, Finding]]:
        if self.trigger and self.trigger not in text:
            return
        for m in self.regex.finditer(text):
            span = self.validate(m)
            if span is not None:
                yield self.rank, Finding(self.entity, span[0], span[1], text[span[0] : span[1]])


# The shared rule set, compiled once: what the security service publishes is this.
_BUILTINS: tuple[_Detector, ...] = tuple(
    _Detector(e.name, e.regex, e.validate, e.rank, e.trigger) for e in sorted(pii.ENTITIES, key=lambda e: e.rank)
)
_RULE_NAME = re.compile(r"[a-z][a-z0-9_]*")


def _select(candidates: list[tuple[int, Finding]]) -> list[Finding]:
    """Longest first, then by rank; keep each candidate that overlaps nothing kept so far."""
    candidates.sort(key=lambda c: (c[1].start - c[1].end, c[0], c[1].start))
    starts: list[int] = []
    kept: list[Finding] = []  # sorted by start and, being disjoint, by end too
    for _, f in candidates:
        i = bisect_right(starts, f.start)
        if (i and kept[i - 1].end > f.start) or (i < len(kept) and kept[i].start < f.end):
            continue
        starts.insert(i, f.start)
        kept.insert(i, f)
    return kept


class Masker:
    """Finds PII in text and replaces it per entity operator. Immutable after construction,
    so one instance can be shared by all requests."""

    def __init__(
        self,
        *,
        operators: Mapping[str, Operator] | None = None,
        rules: Sequence[Rule] = (),
        hash_key: bytes = b"",
    ) -> None:
        self._detectors = _BUILTINS + tuple(self._compile(rule, rank) for rank, rule in enumerate(rules, 10))
        self._operators = self._resolve_operators(operators or {}, rules)
        # No key given: a random per-process key, since a known key lets anyone
        # brute-force a phone number's hash (only ~10^10 candidates).
        self._hash_key = hash_key or secrets.token_bytes(32)

    @staticmethod
    def _compile(rule: Rule, rank: int) -> _Detector:
        if not _RULE_NAME.fullmatch(rule.name) or rule.name in DEFAULT_OPERATORS or rule.name in _ALIASES:
            raise ValueError(f"rule name {rule.name!r}: must be lower snake case and not a built-in entity")
        try:
            regex = re.compile(rule.pattern)
        except re.error as e:
            raise ValueError(f"rule {rule.name!r}: bad pattern: {e}") from e
        return _Detector(rule.name, regex, pii.VALIDATORS[""], rank)

    @staticmethod
    def _resolve_operators(overrides: Mapping[str, Operator], rules: Sequence[Rule]) -> dict[str, Operator]:
        ops = dict(DEFAULT_OPERATORS) | {r.name: Operator(r.operator) for r in rules}
        for key, op in overrides.items():
            targets = _ALIASES.get(key, (key,))
            if any(t not in ops for t in targets):  # a typo would otherwise silently keep the default
                raise ValueError(f"unknown entity {key!r} in operators; known: {sorted(ops)}")
            for t in targets:
                ops[t] = Operator(op)  # config may hand plain strings
        return ops

    def find(self, text: str) -> list[Finding]:
        """Validated, non-overlapping findings sorted by position."""
        return _select([c for d in self._detectors for c in d.scan(text)])

    def mask(self, text: str, vault: Vault | None = None, *, reversible: bool = True) -> tuple[str, list[Finding]]:
        """Replace each finding per its operator. Without a vault, placeholders are still
        consistent within ``text`` but cannot be restored. ``reversible=False``: the field's
        policy forbids restoring, so PSEUDONYMIZE falls back to MASK."""
        findings = self.find(text)
        if not findings:
            return text, findings
        vault = Vault() if vault is None else vault
        parts: list[str] = []
        pos = 0
        for f in findings:
            parts += (text[pos : f.start], self._render(f, vault, reversible))
            pos = f.end
        parts.append(text[pos:])
        return "".join(parts), findings

    def _render(self, f: Finding, vault: Vault, reversible: bool) -> str:
        op = self._operators[f.entity]
        if op is Operator.PSEUDONYMIZE and reversible:
            return vault.placeholder(f.entity, f.value)
        if op is Operator.REDACT:
            return f"[{_label(f.entity)}]"
        if op is Operator.HASH:
            msg = f"{f.entity}\0{_canonical(f.entity, f.value)}".encode()
            return f"<{_label(f.entity)}:{hmac.new(self._hash_key, msg, hashlib.sha256).hexdigest()[:12]}>"
        return _MASKERS.get(f.entity, _mask_generic)(f.value)

    @staticmethod
    def summary(findings: list[Finding]) -> dict[str, int]:
        """Entity -> count, for audit logs: never values or positions."""
        return dict(Counter(f.entity for f in findings))
