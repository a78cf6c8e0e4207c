"""What every row reader shares: the row-problem signal and the field readers that
describe client data without echoing much of it back."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from llmesh.services.trainer.datasets.examples import Example

CLIP = 60  # longest piece of client data echoed back in an error reason

# A row reader yields (row number, Example or the reason the row is bad).
Rows = Iterator[tuple[int, Example | str]]
# One JSON object -> Example, or RowProblem.
Builder = Callable[[dict[str, Any]], Example]


class RowProblem(Exception):
    """One row is unusable; the message is the reason reported for it."""


def text(obj: dict[str, Any], key: str, *, required: bool = True, where: str = "") -> str:
    """A stripped string field; missing/null is fine only when not required."""
    name = f"{where}.{key}" if where else f"'{key}'"
    value = obj.get(key)
    if value is None:
        if required:
            raise RowProblem(f"missing {name}")
        return ""
    if not isinstance(value, str):
        raise RowProblem(f"{name} must be a string, got {type_name(value)}")
    value = value.strip()
    if required and not value:
        raise RowProblem(f"empty {name}")
    return value


def pair_text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise RowProblem(f"{name} must be a string, got {type_name(value)}")
    if not value.strip():
        raise RowProblem(f"empty {name}")
    return value.strip()


def type_name(value: Any) -> str:
    """The JSON name of a value's type, as a client writing JSON knows it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return "string" if isinstance(value, str) else type(value).__name__


def clip(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= CLIP else shown[: CLIP - 3] + "..."
