"""The prompt template library: YAML, rendered server-side with strict variables.

A template may constrain its answers (`response_format` in the YAML): `json_schema` (the
schema as YAML) or `choice_from: <variable>` (the choices are that variable's value split on
, ， 、 /). The request's own response_format wins over the template's."""

from __future__ import annotations

import json
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llmesh.pb.common.v1 import types_pb2
from llmesh.pb.inference.v1 import inference_pb2 as pb
from llmesh.runtime.errors import InvalidArgument, NotFound
from llmesh.services.inference.response_format import check_choices, split_choices

BUNDLED = Path(__file__).with_name("templates.yaml")
MAX_VARIABLE_CHARS = 8_000


@dataclass(frozen=True)
class Template:
    name: str
    description: str
    text: str
    variables: tuple[str, ...]
    sampling: types_pb2.SamplingParams
    schema: str = ""  # JSON Schema text the answers follow ("" = none)
    choice_from: str = ""  # the variable whose value lists the answer's choices ("" = none)

    @property
    def response_format(self) -> pb.ResponseFormat | None:
        """What ListTemplates shows: the schema, or an empty choice list (filled per request
        from `choice_from`)."""
        if self.schema:
            return pb.ResponseFormat(json_schema=self.schema)
        if self.choice_from:
            return pb.ResponseFormat(choice=pb.ChoiceList())
        return None

    def format_for(self, values: Mapping[str, str], field: str = "template.variables") -> pb.ResponseFormat | None:
        """The response format of one rendering (choices taken from their variable)."""
        if self.choice_from:
            choices = split_choices(values.get(self.choice_from, ""))
            check_choices(choices, f"{field}.{self.choice_from}")
            return pb.ResponseFormat(choice=pb.ChoiceList(choices=choices))
        return self.response_format

    def render(self, values: Mapping[str, str], field: str = "template.variables") -> str:
        missing = [v for v in self.variables if v not in values]
        if missing:
            raise InvalidArgument(
                f"{field}.{missing[0]}", f"required by template '{self.name}' (needs {', '.join(self.variables)})"
            )
        unknown = sorted(set(values) - set(self.variables))
        if unknown:
            raise InvalidArgument(
                f"{field}.{unknown[0]}", f"not a variable of template '{self.name}' (has {', '.join(self.variables)})"
            )
        for k, v in values.items():
            if not v.strip():
                raise InvalidArgument(f"{field}.{k}", "must not be empty")
            if len(v) > MAX_VARIABLE_CHARS:
                raise InvalidArgument(f"{field}.{k}", f"longer than {MAX_VARIABLE_CHARS} characters")
        return self.text.format_map(dict(values))


def _variables(text: str) -> tuple[str, ...]:
    seen: list[str] = []
    for _, name, spec, conv in string.Formatter().parse(text):
        if name is None:
            continue
        if not name.isidentifier() or spec or conv:
            raise ValueError(f"placeholder {{{name}}} must be a plain identifier")
        if name not in seen:
            seen.append(name)
    return tuple(seen)


def _format_spec(name: str, spec: Any, variables: tuple[str, ...]) -> tuple[str, str]:
    """(schema JSON text, choice variable) of a template's response_format entry."""
    if spec is None:
        return "", ""
    if not isinstance(spec, dict) or len(spec) != 1 or not {"json_schema", "choice_from"} >= set(spec):
        raise ValueError(f"template {name}: response_format takes one of json_schema, choice_from")
    if "choice_from" in spec:
        if spec["choice_from"] not in variables:
            raise ValueError(f"template {name}: choice_from names no variable of the prompt")
        return "", str(spec["choice_from"])
    return json.dumps(spec["json_schema"], ensure_ascii=False), ""


class TemplateLibrary:
    def __init__(self, templates: dict[str, Template]) -> None:
        self._templates = templates

    @classmethod
    def load(cls, path: Path | None = None) -> TemplateLibrary:
        doc = yaml.safe_load((path or BUNDLED).read_text(encoding="utf-8"))
        out: dict[str, Template] = {}
        for name, spec in doc["templates"].items():
            sampling = types_pb2.SamplingParams(**spec.get("sampling", {}))
            variables = _variables(spec["prompt"])
            schema, choice_from = _format_spec(name, spec.get("response_format"), variables)
            out[name] = Template(
                name, spec.get("description", ""), spec["prompt"], variables, sampling, schema, choice_from
            )
        return cls(out)

    def get(self, name: str) -> Template:
        if not name:
            raise InvalidArgument("template.name", "must be set")
        try:
            return self._templates[name]
        except KeyError:
            raise NotFound("template", name) from None

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(sorted(self._templates.values(), key=lambda t: t.name))
