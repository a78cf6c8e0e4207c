"""The one PII rule set: the built-in entities, their candidate patterns, the second
checks that decide, and their default operators.

The gateway's masker (``services/gateway/masking.py``) compiles exactly these entities,
and the security service publishes exactly these (``GetMaskingRules``): there is no
second list. Each entity is a regex that only proposes candidates plus a named
validator (check digit, Luhn, ``ipaddress``) that decides, because a bare digit pattern
would also hit order numbers, amounts and dates. Patterns are Python ``re`` syntax,
delimited by look-arounds rather than ``\\b`` (CJK characters count as word
characters), and accept full-width digits (Chinese IMEs type them).

Validators, by published name:

* ``cn_id_checksum``: GB 11643-1999: region code 1-8, a real birth date since 1900,
  the check character over the first 17 digits.
* ``luhn``: 16-19 digits, not all one digit, Luhn check; when a separated 1-3 digit
  tail fails, the digits before it are tried alone (``card 4111… 12 installments``).
* ``ip_address``: parses as an address (no leading zeros, octets ≤ 255), not a bare ``::``.
* ``""``: the pattern decides (empty matches are ignored).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum

__all__ = [
    "ENTITIES",
    "REVERSIBLE",
    "VALIDATORS",
    "VERSION",
    "Entity",
    "Operator",
    "Span",
    "compact",
    "is_bank_card",
    "is_cn_id",
    "luhn_ok",
]


class Operator(StrEnum):
    MASK = "mask"  # entity-specific partial mask, e.g. 138****8000
    REDACT = "redact"  # a label
    HASH = "hash"  # keyed hash
    PSEUDONYMIZE = "pseudonymize"  # a placeholder the gateway restores for the same caller


REVERSIBLE = frozenset({Operator.PSEUDONYMIZE})

# ---------------------------------------------------------------- candidate patterns
_D = "[0-9\uff10-\uff19]"
_ND = rf"(?!{_D})"  # not followed by a digit: a match never ends inside a longer run
_FULLWIDTH = str.maketrans("\uff10\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18\uff19", "0123456789")


def _first(chars: str, not_after: str) -> str:
    """A first character from ``chars`` not preceded by one of ``not_after``.

    Written char-class first (the boundary is a lookbehind *after* it) because sre then
    skips through the text with a fast charset scan instead of trying the pattern at every
    position: about 3x faster than a leading lookbehind on mixed Chinese/English text.
    """
    return f"{chars}(?<!{not_after}{chars})"


# Optional +86 / 0086 / 86 prefix, then 1[3-9]x in 3-4-4 groups. Each prefix branch
# re-reads the already consumed first character via a lookbehind.
_MOBILE = (
    _first("[+0-9\uff10-\uff19]", "[+0-9\uff10-\uff19]")
    + r"(?:(?<=\+)86[ -]?[1\uff11]|(?<=0)086[ -]?[1\uff11]|(?<=8)6[ -]?[1\uff11]|(?<=[1\uff11]))"
    + rf"[3-9\uff13-\uff19]{_D}(?:[ -]?{_D}{{4}}){{2}}{_ND}"
)
_CN_ID = _first(_D, _D) + rf"{_D}{{5}} ?{_D}{{8}} ?{_D}{{3}}[0-9Xx\uff10-\uff19]{_ND}(?![Xx])"
# A separated 1-3 digit tail is optional so "card 4111… 12" can fall back to the 16 digits.
_CARD = _first(_D, _D) + rf"{_D}{{3}}(?:[ -]?{_D}{{4}}){{3}}(?P<tail>[ -]?{_D}{{1,3}})?{_ND}"
# The local part never starts or ends with a dot nor holds two in a row (RFC 5322
# dot-atom): each dot must be followed by another local character.
_LOCAL = r"[A-Za-z0-9._%+\-]"
_LOCAL_NO_DOT = r"[A-Za-z0-9_%+\-]"
_EMAIL = (
    _first(_LOCAL_NO_DOT, _LOCAL)
    + rf"(?:{_LOCAL_NO_DOT}|\.(?={_LOCAL_NO_DOT}))*"
    + r"@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}(?![A-Za-z0-9\-])"
)
# Letters/dots on the left or a dotted digit on the right mean "v1.2.3.4" / "1.2.3.4.5".
_IPV4 = _first("[0-9]", "[A-Za-z0-9_.]") + r"[0-9]{0,2}\.(?:[0-9]{1,3}\.){2}[0-9]{1,3}(?![A-Za-z0-9_]|\.[0-9])"
# Starts after a non-hex char, after "label:" or "IPv6:", never mid-address (that would
# turn "1:2:3:4:5:6:7:8:9" into a valid tail). Shape only: ``ipaddress`` validates.
_IPV6 = (
    r"[0-9A-Fa-f:](?:(?<![0-9A-Za-z_.:].)|(?<=[^0-9A-Fa-f:]:.)|(?<=[vV]6:.))"
    r"(?:(?<=[0-9A-Fa-f])[0-9A-Fa-f]{0,3}(?::[0-9A-Fa-f]{0,4}){2,7}|(?<=:)(?::[0-9A-Fa-f]{0,4}){1,7})"
    r"(?:(?<=:)(?:[0-9]{1,3}\.){3}[0-9]{1,3})?"
    r"(?![0-9A-Za-z_:]|\.[0-9])"
)

# ---------------------------------------------------------------- validators
Span = tuple[int, int]
Validator = Callable[[re.Match[str]], Span | None]

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def compact(value: str) -> str:
    """Digits only (ASCII), separators dropped; an ID's trailing X is kept upper-case."""
    return "".join(c for c in value.translate(_FULLWIDTH).upper() if c.isalnum())


def cn_id_check_digit(first17: str) -> str:
    """GB 11643-1999 check character for the first 17 digits."""
    return _ID_CHECK[sum(int(c) * w for c, w in zip(first17, _ID_WEIGHTS, strict=True)) % 11]


def _is_real_birth_date(yyyymmdd: str) -> bool:
    try:
        born = date(int(yyyymmdd[:4]), int(yyyymmdd[4:6]), int(yyyymmdd[6:]))
    except ValueError:
        return False
    return date(1900, 1, 1) <= born <= date.today()


def is_cn_id(value: str) -> bool:
    s = compact(value)
    return (
        len(s) == 18
        and s[0] in "12345678"  # region codes start 1-8
        and _is_real_birth_date(s[6:14])
        and cn_id_check_digit(s[:17]) == s[17]
    )


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def is_bank_card(value: str) -> bool:
    s = compact(value)
    # One repeated digit ("0000…") passes Luhn but is filler, not a card.
    return 16 <= len(s) <= 19 and s.isdigit() and len(set(s)) > 1 and luhn_ok(s)


def _valid_id(m: re.Match[str]) -> Span | None:
    return m.span() if is_cn_id(m.group()) else None


def _valid_card(m: re.Match[str]) -> Span | None:
    if is_bank_card(m.group()):
        return m.span()
    tail = m.start("tail") if "tail" in m.re.groupindex else -1
    if tail != -1 and not m.group("tail")[0].isalnum():  # retry without a separated tail
        if is_bank_card(m.string[m.start() : tail]):
            return m.start(), tail
    return None


def _valid_ip(m: re.Match[str]) -> Span | None:
    if not any(c.isalnum() for c in m.group()):  # a bare "::" in prose is not an address
        return None
    try:
        ipaddress.ip_address(m.group())  # also rejects leading zeros and octets > 255
    except ValueError:
        return None
    return m.span()


def _shape_only(m: re.Match[str]) -> Span | None:
    """The pattern is the whole check; empty matches are noise."""
    return m.span() if m.end() > m.start() else None


VALIDATORS: Mapping[str, Validator] = {
    "": _shape_only,
    "cn_id_checksum": _valid_id,
    "luhn": _valid_card,
    "ip_address": _valid_ip,
}


# ---------------------------------------------------------------- the rule set
@dataclass(frozen=True)
class Entity:
    """One built-in PII entity, as published and as enforced."""

    name: str
    pattern: str  # candidate pattern, Python ``re`` syntax
    validator: str  # a key of VALIDATORS
    operator: Operator  # the default operator (config may override it)
    label: str  # placeholder tag: <PHONE_1>
    rank: int  # equal-length overlap: the lower rank wins
    trigger: str = ""  # a substring every match holds: the regex is skipped without it
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", re.compile(self.pattern))

    @property
    def reversible(self) -> bool:
        return self.operator in REVERSIBLE

    def validate(self, m: re.Match[str]) -> Span | None:
        return VALIDATORS[self.validator](m)


# Published in this order; overlaps resolve longest first, then by rank (an 18-digit ID
# that also passes Luhn is an ID).
ENTITIES: tuple[Entity, ...] = (
    Entity("cn_mobile", _MOBILE, "", Operator.PSEUDONYMIZE, "PHONE", rank=2),
    Entity("cn_id", _CN_ID, "cn_id_checksum", Operator.PSEUDONYMIZE, "ID", rank=0),
    Entity("bank_card", _CARD, "luhn", Operator.PSEUDONYMIZE, "CARD", rank=1),
    Entity("email", _EMAIL, "", Operator.PSEUDONYMIZE, "EMAIL", rank=3, trigger="@"),
    Entity("ipv4", _IPV4, "ip_address", Operator.MASK, "IP", rank=5, trigger="."),
    Entity("ipv6", _IPV6, "ip_address", Operator.MASK, "IP", rank=4, trigger=":"),
)

# Changes whenever a rule changes (content hash of what is published).
VERSION = (
    "builtin-"
    + hashlib.sha256(
        json.dumps(
            [[e.name, e.pattern, e.validator, e.operator.value, e.label] for e in ENTITIES], ensure_ascii=False
        ).encode()
    ).hexdigest()[:12]
)
