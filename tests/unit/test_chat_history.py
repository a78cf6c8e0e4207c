"""Chat-history trimming and the messages of one chat turn (services/inference/chat_history.py)."""

from __future__ import annotations

import pytest

from llmesh.services.inference.chat_history import fit_history, turn_messages
from llmesh.services.inference.memory import History, Message


def turns(*pairs: tuple[str, str]) -> list[Message]:
    return [m for u, a in pairs for m in (Message("user", u), Message("assistant", a))]


PAST = turns(("aaaa", "bbbb"), ("cc", "dd"), ("e", "f"))  # 8 + 4 + 2 characters


@pytest.mark.parametrize(
    ("budget", "kept"),
    [(14, 6), (100, 6), (13, 4), (6, 4), (5, 2), (2, 2), (1, 0), (0, 0), (-5, 0)],
)
def test_fit_history_drops_oldest_whole_turns(budget: int, kept: int) -> None:
    out = fit_history(PAST, budget)
    assert out == PAST[len(PAST) - kept :]
    assert sum(len(m.content) for m in out) <= max(budget, 0)
    assert not out or out[0].role == "user"  # never starts mid-turn


def test_fit_history_of_an_odd_tail_keeps_nothing_partial() -> None:
    assert fit_history([Message("user", "x" * 10)], 5) == []
    assert fit_history([], 10) == []


def test_new_conversation_has_the_message_and_the_requested_system() -> None:
    assert turn_messages(None, "hi", "", 100) == [{"role": "user", "content": "hi"}]
    assert turn_messages(None, "hi", "be brief", 100) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]


def test_stored_system_applies_unless_the_request_sets_one() -> None:
    history = History(system="stored", messages=turns(("q", "a")), ttl_seconds=60)
    assert turn_messages(history, "next", "", 100) == [
        {"role": "system", "content": "stored"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "next"},
    ]
    assert turn_messages(history, "next", "new", 100)[0] == {"role": "system", "content": "new"}


def test_budget_counts_the_message_and_the_system_prompt() -> None:
    history = History(system="sys", messages=PAST, ttl_seconds=60)  # 3 + 14 history + 4 message
    assert len(turn_messages(history, "next", "", 21)) == 1 + 6 + 1
    assert len(turn_messages(history, "next", "", 20)) == 1 + 4 + 1  # the oldest turn goes first
    assert turn_messages(history, "next", "", 7) == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "next"},
    ]
