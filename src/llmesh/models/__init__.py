"""Demo models built locally (no downloads): see :mod:`llmesh.models.demo`."""

from __future__ import annotations

import pathlib


def init_models(home: pathlib.Path, force: bool = False) -> dict[str, pathlib.Path]:
    """Build (or reuse) the tiny demo LLM and CLIP under ``home/"models"``.

    Thin lazy wrapper around :func:`llmesh.models.demo.init_models`; importing this
    package stays cheap (no torch / transformers import).
    """
    from llmesh.models.demo import init_models as _init

    return _init(home, force=force)


__all__ = ["init_models"]
