"""Runs mypy (strict, configured in pyproject.toml) over the package as it installs.

mypy names modules by folder, and the services are installed from ``services/`` as
``llmesh.services`` (a setuptools package-dir mapping mypy cannot read). So this builds
``build/typecheck/llmesh/``, a tree of symlinks in the installed layout (``src/llmesh`` +
``services/`` → ``llmesh/services``), and checks it with the tests and benches. Each Triton
model folder (``triton_models/<m>/1``) is checked on its own: the Python backend imports its
modules as top-level ones. Findings are reported with the real paths.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from mypy import api

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "typecheck"


def link_tree() -> dict[str, str]:
    """Fresh symlink tree; returns link path → real path (relative to ROOT) for reporting."""
    shutil.rmtree(TREE, ignore_errors=True)
    back: dict[str, str] = {}
    for src, dst in ((ROOT / "src" / "llmesh", TREE / "llmesh"), (ROOT / "services", TREE / "llmesh" / "services")):
        for f in src.rglob("*"):
            if f.suffix not in (".py", ".pyi") and f.name != "py.typed":
                continue
            if "__pycache__" in f.parts or (dst == TREE / "llmesh" and f.relative_to(src).parts[0] == "services"):
                continue
            link = dst / f.relative_to(src)
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(f, link)
            back[str(link.relative_to(ROOT))] = str(f.relative_to(ROOT))
    return back


def main() -> int:
    back = link_tree()
    runs: list[list[str]] = [[]] + [[str(d.relative_to(ROOT))] for d in sorted(ROOT.glob("triton_models/*/1"))]
    pattern = re.compile("|".join(re.escape(k) for k in sorted(back, key=len, reverse=True)))
    status = 0
    os.chdir(ROOT)
    for extra in runs:
        if extra:  # a Triton model folder: its own module namespace
            extra = ["--config-file", "pyproject.toml", *extra]
            os.environ["MYPYPATH"] = extra[-1]
        out, err, code = api.run(extra)
        sys.stdout.write(pattern.sub(lambda m: back[m.group(0)], out))
        sys.stderr.write(err)
        status = max(status, code)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
