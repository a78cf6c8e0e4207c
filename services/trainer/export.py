"""Export: an adapter merged into its base model (``merge_and_unload``), saved as a
standalone Hugging Face model folder (weights + tokenizer) for engines that need merged
weights (TensorRT-LLM builds, vLLM without LoRA, llama.cpp conversion)."""

from __future__ import annotations

import shutil
from pathlib import Path

from llmesh.runtime.files import publish_dir


def merge(base: Path, adapter: Path, dest: Path) -> Path:
    """Write the merged model to ``dest`` (which must not exist): built in a sibling
    temporary folder and renamed into place, so ``dest`` is complete or absent."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dest.exists():
        raise FileExistsError(f"{dest} already exists")
    tmp = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    for extra in ("lineage.json", "loss.png"):  # where it came from travels with it
        if (adapter / extra).is_file():
            shutil.copy2(adapter / extra, tmp / extra)
    publish_dir(tmp, dest)
    return dest
