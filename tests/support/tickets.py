"""A generated helpdesk-ticket triage dataset (no download): a short ticket in, one fixed-format
line out. Large enough (50+ rows) that the trainer generalises from it, and learnable: the
category follows from a keyword and the rest is copied from the ticket, so held-out rows
are answered right only by a model that learned the format."""

from __future__ import annotations

import random

CATEGORIES = {
    "hardware": ("printer", "laptop screen", "keyboard", "docking station", "monitor"),
    "network": ("VPN", "Wi-Fi", "network drive", "proxy"),
    "account": ("password", "login", "two-factor code", "account lock"),
    "software": ("Excel", "Outlook", "Teams", "the ERP client"),
}
PROBLEMS = ("does not work", "keeps failing", "stopped working this morning", "is very slow")
BUILDINGS = ("A", "B", "C", "D")


def ticket_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` distinct {"question", "answer"} rows (the trainer's FAQ format)."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < n:
        category = rng.choice(sorted(CATEGORIES))
        thing = rng.choice(CATEGORIES[category])
        number = rng.randrange(1000, 9999)
        building = rng.choice(BUILDINGS)
        question = f"Ticket {number}: the {thing} {rng.choice(PROBLEMS)} (building {building})."
        if question in seen:
            continue
        seen.add(question)
        rows.append({"question": question, "answer": f"{category} | ticket {number} | building {building}"})
    return rows
