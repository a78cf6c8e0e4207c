"""Row readers for the JSON formats: alpaca/FAQ objects (array or lines) and chat lines
in OpenAI or ShareGPT shape."""

from __future__ import annotations

import json
from typing import Any

from llmesh.services.trainer.datasets.examples import ROLES, Example, Message, build_example, turn_problem
from llmesh.services.trainer.datasets.rows import Builder, RowProblem, Rows, clip, pair_text, text, type_name

_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def json_array_rows(data: str, build: Builder) -> Rows:
    try:
        doc = json.loads(data)
    except json.JSONDecodeError as e:
        yield 0, f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        return
    except RecursionError:
        yield 0, "invalid JSON: nested too deeply"
        return
    if not isinstance(doc, list):
        yield 0, f"expected a JSON array of objects, got {type_name(doc)}"
        return
    for i, obj in enumerate(doc, start=1):
        yield i, _build(build, obj)


def jsonl_rows(data: str, build: Builder) -> Rows:
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends unescaped.
    for lineno, line in enumerate(data.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, f"invalid JSON: {e.msg} at column {e.colno}"
            continue
        except RecursionError:
            yield lineno, "invalid JSON: nested too deeply"
            continue
        yield lineno, _build(build, obj)


def _build(build: Builder, obj: Any) -> Example | str:
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type_name(obj)}"
    try:
        return build(obj)
    except RowProblem as e:
        return str(e)


def alpaca_example(obj: dict[str, Any]) -> Example:
    """alpaca {instruction, input?, output, system?, history?}, or FAQ {question, answer}."""
    if "instruction" not in obj and "output" not in obj and ("question" in obj or "answer" in obj):
        return build_example(None, [], text(obj, "question"), text(obj, "answer"))
    user = text(obj, "instruction")
    extra = text(obj, "input", required=False)
    if extra:  # the alpaca convention: the input is context for the instruction
        user = f"{user}\n{extra}"
    history = []
    raw = obj.get("history")
    if raw is not None:
        if not isinstance(raw, list):
            raise RowProblem(f"'history' must be an array of [user, assistant] pairs, got {type_name(raw)}")
        for i, pair in enumerate(raw):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise RowProblem(f"history[{i}] must be a [user, assistant] pair")
            history.append((pair_text(pair[0], f"history[{i}][0]"), pair_text(pair[1], f"history[{i}][1]")))
    return build_example(text(obj, "system", required=False) or None, history, user, text(obj, "output"))


def chat_example(obj: dict[str, Any]) -> Example:
    """OpenAI {"messages": [{role, content}]} or ShareGPT {"conversations": [{from, value}]}."""
    roles: dict[str, str]
    if "messages" in obj:
        key, role_key, text_key, roles = "messages", "role", "content", {r: r for r in ROLES}
    elif "conversations" in obj:
        key, role_key, text_key, roles = "conversations", "from", "value", _SHAREGPT_ROLES
    else:
        raise RowProblem("expected a 'messages' or 'conversations' array")
    turns = obj[key]
    if not isinstance(turns, list):
        raise RowProblem(f"'{key}' must be an array, got {type_name(turns)}")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise RowProblem(f"{where} must be an object, got {type_name(turn)}")
        role = turn.get(role_key)
        if role is None:
            raise RowProblem(f"missing {where}.{role_key}")
        if not isinstance(role, str) or role.strip().lower() not in roles:
            raise RowProblem(f"{where}.{role_key} must be one of {', '.join(roles)}, got {clip(role)}")
        messages.append(Message(roles[role.strip().lower()], text(turn, text_key, where=where)))
    problem = turn_problem([m.role for m in messages])
    if problem is not None:
        raise RowProblem(f"{key}[{problem[0]}]: {problem[1]}" if problem[0] >= 0 else problem[1])
    return Example(tuple(messages))
