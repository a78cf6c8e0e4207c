"""The hyperparameters a training job runs with: range checks and what this host can run."""

from __future__ import annotations

import functools
from typing import Any

from llmesh.runtime.errors import FailedPrecondition, InvalidArgument
from llmesh.services.trainer import registry


def check(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` (defaults already filled in) if this trainer can run them, else the
    error naming the request field."""
    if params["qlora"] and not qlora_possible():
        raise FailedPrecondition("QLoRA needs a CUDA GPU and bitsandbytes; neither is available on this trainer")
    p = params
    registry.check_name(p["adapter_name"])
    checks = [
        ("lora.rank", 1 <= p["rank"] <= 256),
        ("lora.dropout", 0 <= p["dropout"] < 1),
        ("epochs", 1 <= p["epochs"] <= 1000),
        ("learning_rate", 0 < p["learning_rate"] <= 1),
        ("batch_size", 1 <= p["batch_size"] <= 1024),
        ("max_length", 16 <= p["max_length"] <= 32768),
        ("lora.alpha", 0 < p["alpha"] <= 4096),
        ("min_improvement", -1 <= p["min_improvement"] <= 1),
    ]
    for field, ok in checks:
        if not ok:
            raise InvalidArgument(field, "out of range")
    return params


@functools.cache
def qlora_possible() -> bool:
    """Asked only when a job wants QLoRA: importing torch costs the service seconds and
    hundreds of MB it otherwise never needs (training happens in the worker)."""
    try:
        import importlib.util

        import torch

        return bool(torch.cuda.is_available()) and importlib.util.find_spec("bitsandbytes") is not None
    except Exception:  # torch missing or broken: no GPU path either way
        return False
