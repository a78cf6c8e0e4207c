"""A request's ResponseFormat → the llm model's response_format_json, checked at the edge.

What can be checked without the model is checked here, naming the field
(``response_format.json_schema`` ...); the model compiles the grammar and refuses what its
engine cannot do (reported as ``response_format``, llm_backend.API_FIELDS). The JSON the model
takes: {"type": "json_schema", "schema": {...}} | {"type": "choice", "choices": [...]} |
{"type": "regex", "pattern": "..."} | {"type": "json_object"} (triton_models/llm/config.pbtxt).
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no stubs in the pinned set; used for check_schema only

from llmesh.pb.inference.v1 import inference_pb2 as pb
from llmesh.runtime.errors import InvalidArgument

MAX_CHOICES = 64
MAX_CHOICE_CHARS = 256
MAX_FORMAT_CHARS = 32_000  # a schema or regex larger than this is not a response format
CHOICE_SEPARATORS = re.compile(r"[,，、/]")  # how a template's categories variable lists them


def _schema(text: str, field: str) -> Any:
    if len(text) > MAX_FORMAT_CHARS:
        raise InvalidArgument(field, f"is {len(text)} characters, the limit is {MAX_FORMAT_CHARS}")
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(field, f"is not valid JSON ({exc})") from None
    if not isinstance(schema, (dict, bool)):
        raise InvalidArgument(field, "must be a JSON Schema object")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "the root"
        raise InvalidArgument(field, f"is not a valid JSON Schema at {where}: {exc.message}") from None
    return schema


def check_choices(choices: list[str], field: str) -> list[str]:
    if not choices:
        raise InvalidArgument(field, "must list at least one choice")
    if len(choices) > MAX_CHOICES:
        raise InvalidArgument(field, f"has {len(choices)} choices, the limit is {MAX_CHOICES}")
    for i, c in enumerate(choices):
        if not c.strip():
            raise InvalidArgument(f"{field}[{i}]", "must not be empty")
        if len(c) > MAX_CHOICE_CHARS:
            raise InvalidArgument(f"{field}[{i}]", f"is {len(c)} characters, the limit is {MAX_CHOICE_CHARS}")
    if len(set(choices)) != len(choices):
        dup = next(c for i, c in enumerate(choices) if c in choices[:i])
        raise InvalidArgument(field, f"lists {dup!r} twice")
    return choices


def _regex(pattern: str, field: str) -> str:
    if not pattern:
        raise InvalidArgument(field, "must not be empty")
    if len(pattern) > MAX_FORMAT_CHARS:
        raise InvalidArgument(field, f"is {len(pattern)} characters, the limit is {MAX_FORMAT_CHARS}")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise InvalidArgument(field, f"does not compile ({exc})") from None
    return pattern


def model_json(fmt: pb.ResponseFormat, field: str = "response_format") -> str:
    """The model's response_format_json for this format ("" when none is set)."""
    which = fmt.WhichOneof("format")
    if which is None:
        return ""
    out: dict[str, Any]
    if which == "json_schema":
        out = {"type": "json_schema", "schema": _schema(fmt.json_schema, f"{field}.json_schema")}
    elif which == "choice":
        out = {"type": "choice", "choices": check_choices(list(fmt.choice.choices), f"{field}.choice.choices")}
    elif which == "regex":
        out = {"type": "regex", "pattern": _regex(fmt.regex, f"{field}.regex")}
    else:
        if not fmt.json_object:
            raise InvalidArgument(f"{field}.json_object", "must be true when set")
        out = {"type": "json_object"}
    return json.dumps(out, ensure_ascii=False)


def split_choices(text: str) -> list[str]:
    """A categories variable ("正面,负面,中性", "spam / ham") → its choices."""
    return [c.strip() for c in CHOICE_SEPARATORS.split(text) if c.strip()]


def structured_pb(structured_json: str) -> pb.StructuredOutput | None:
    """The model's structured_json verdict → StructuredOutput (None for unconstrained output)."""
    if not structured_json:
        return None
    doc = json.loads(structured_json)
    return pb.StructuredOutput(
        valid=bool(doc.get("valid")),
        choices=[
            pb.ChoiceProbability(choice=str(c["choice"]), probability=float(c["probability"]))
            for c in doc.get("choices", [])
        ],
    )
