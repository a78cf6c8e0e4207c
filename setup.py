"""Build hooks only; the project is declared in pyproject.toml.

The services live in the top-level ``services/`` folder and install as
``llmesh.services``; the Triton model repository ships as ``llmesh.triton_models``.
A wheel carries the generated protobuf code, produced by this build from ``protos/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithProtos(build_py):  # type: ignore[misc]  # setuptools is untyped in the build env
    """build_py that also generates ``llmesh.pb`` into the build folder (not the source tree)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install imports the tree; scripts/gen_protos.sh generates there
        sys.path.insert(0, str(ROOT / "scripts"))
        from protogen import generate

        generate(ROOT / "protos", Path(self.build_lib))


packages = (
    [p for p in find_packages("src") if not p.startswith("llmesh.pb")]
    + ["llmesh.services"]
    + [f"llmesh.services.{p}" for p in find_packages("services")]
    + ["llmesh.triton_models"]
)

setup(
    packages=packages,
    package_dir={"": "src", "llmesh.services": "services", "llmesh.triton_models": "triton_models"},
    cmdclass={"build_py": BuildWithProtos},
)
