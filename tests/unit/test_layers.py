"""Import layering: dependencies between the shared packages go one way.

``llmesh.runtime`` is the bottom layer (it imports neither ``llmesh.auth`` nor a
service); ``llmesh.auth`` may import the runtime but no service. Checked on the source
(every import statement, function-level ones included), so a cycle cannot hide behind
an import that happens to run late.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import llmesh

SRC = Path(llmesh.__file__).parent
FORBIDDEN = {
    "runtime": ("llmesh.auth", "llmesh.services"),
    "auth": ("llmesh.services",),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_shared_packages_import_one_way(package: str) -> None:
    bad = [
        f"{path.relative_to(SRC)}:{line} imports {name}"
        for path in sorted((SRC / package).rglob("*.py"))
        for line, name in _imports(path)
        if name.startswith(FORBIDDEN[package])
    ]
    assert not bad, bad
