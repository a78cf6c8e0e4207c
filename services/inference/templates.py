"""The prompt template library: YAML, rendered server-side with strict variables."""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from llmesh.pb.common.v1 import types_pb2
from llmesh.runtime.errors import InvalidArgument, NotFound

BUNDLED = Path(__file__).with_name("templates.yaml")
MAX_VARIABLE_CHARS = 8_000


@dataclass(frozen=True)
class Template:
    name: str
    description: str
    text: str
    variables: tuple[str, ...]
    sampling: types_pb2.SamplingParams

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


class TemplateLibrary:
    def __init__(self, templates: dict[str, Template]) -> None:
        self._templates = templates

    @classmethod
    def load(cls, path: Path | None = None) -> TemplateLibrary:
        doc = yaml.safe_load((path or BUNDLED).read_text(encoding="utf-8"))
        out: dict[str, Template] = {}
        for name, spec in doc["templates"].items():
            sampling = types_pb2.SamplingParams(**spec.get("sampling", {}))
            out[name] = Template(
                name, spec.get("description", ""), spec["prompt"], _variables(spec["prompt"]), sampling
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
