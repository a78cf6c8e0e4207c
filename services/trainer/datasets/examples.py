"""The normalized form every dataset format becomes: chat examples, and row errors."""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("system", "user", "assistant")


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
        problem = turn_problem([m.role for m in self.messages])
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


def build_example(system: str | None, history: list[tuple[str, str]], user: str, assistant: str) -> Example:
    """An example from an optional system prompt, earlier (user, assistant) turns and the target turn."""
    messages = [Message("system", system)] if system else []
    for u, a in history:
        messages += [Message("user", u), Message("assistant", a)]
    messages += [Message("user", user), Message("assistant", assistant)]
    return Example(tuple(messages))


def turn_problem(roles: list[str]) -> tuple[int, str] | None:
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
