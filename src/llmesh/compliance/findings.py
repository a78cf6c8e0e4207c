"""What a check reports: findings (a status and one line of evidence) folded into a `Check`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Status = Literal["pass", "warn", "fail"]
Finding = tuple[Status, str]

_RANK: dict[Status, int] = {"pass": 0, "warn": 1, "fail": 2}


@dataclass(frozen=True)
class Check:
    id: str
    title: str
    status: Status
    evidence: list[str]

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def worst(statuses: Iterable[Status]) -> Status:
    return max(statuses, key=_RANK.__getitem__, default="pass")


def make_check(check_id: str, title: str, findings: list[Finding]) -> Check:
    """The check's status is its worst finding; non-passing lines are tagged so a reader
    sees which evidence caused it."""
    lines = [text if s == "pass" else f"{s.upper()}: {text}" for s, text in findings]
    return Check(check_id, title, worst(s for s, _ in findings), lines)
