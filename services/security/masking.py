"""The built-in PII entities the gateway masks, with their default operators.

The operator vocabulary and defaults match the gateway's masker: identifiers
(ID, mobile, card, e-mail) are pseudonymized (reversible for the same caller),
IP addresses partially masked. Patterns are candidates in Python ``re`` syntax,
delimited by look-arounds rather than ``\\b`` (CJK characters count as word
characters); ``validator`` names the second check that decides.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

OPERATORS = ("mask", "redact", "hash", "pseudonymize")
REVERSIBLE = {"pseudonymize"}

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_H = r"[0-9A-Fa-f]{1,4}"
_IPV6 = (
    r"(?<![0-9A-Fa-f:])(?:"
    rf"(?:{_H}:){{7}}{_H}"
    rf"|(?:{_H}:){{1,7}}:"
    rf"|(?:{_H}:){{1,6}}:{_H}"
    rf"|(?:{_H}:){{1,5}}(?::{_H}){{1,2}}"
    rf"|(?:{_H}:){{1,4}}(?::{_H}){{1,3}}"
    rf"|(?:{_H}:){{1,3}}(?::{_H}){{1,4}}"
    rf"|(?:{_H}:){{1,2}}(?::{_H}){{1,5}}"
    rf"|{_H}:(?::{_H}){{1,6}}"
    rf"|:(?::{_H}){{1,7}}"
    r")(?![0-9A-Fa-f:])"
)


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: str
    operator: str
    validator: str
    label: str

    @property
    def reversible(self) -> bool:
        return self.operator in REVERSIBLE


RULES: tuple[Rule, ...] = (
    Rule(
        "cn_mobile", r"(?<![0-9])(?:(?:\+|00)?86[- ]?)?1[3-9]\d(?:[- ]?\d{4}){2}(?![0-9])", "pseudonymize", "", "PHONE"
    ),
    Rule(
        "cn_id",
        r"(?<![0-9])[1-9]\d{5} ?(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01]) ?\d{3}[0-9Xx](?![0-9Xx])",
        "pseudonymize",
        "cn_id_checksum",
        "ID",
    ),
    Rule(
        "bank_card",
        r"(?<![0-9])[1-9]\d{3}(?:[ -]?\d{4}){2,3}(?:[ -]?\d{1,3})?(?![0-9])",
        "pseudonymize",
        "luhn",
        "CARD",
    ),
    Rule(
        "email",
        r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
        r"(?![A-Za-z0-9-])",
        "pseudonymize",
        "",
        "EMAIL",
    ),
    Rule("ipv4", rf"(?<![A-Za-z0-9_.])(?:{_OCTET}\.){{3}}{_OCTET}(?![A-Za-z0-9_]|\.[0-9])", "mask", "ip_address", "IP"),
    Rule("ipv6", _IPV6, "mask", "ip_address", "IP"),
)

VERSION = "builtin-" + hashlib.sha256(json.dumps([asdict(r) for r in RULES], sort_keys=True).encode()).hexdigest()[:12]
