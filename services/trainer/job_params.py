"""The hyperparameters a training job runs with: the request's explicit values, the rest
chosen for the data (``plan``), range checks and what this host can run."""

from __future__ import annotations

import functools
from typing import Any

from llmesh.pb.trainer.v1 import trainer_pb2 as pb
from llmesh.runtime.errors import FailedPrecondition, InvalidArgument
from llmesh.services.trainer import plan, registry

MODES = {pb.TRAINING_MODE_MEMORISE: plan.MEMORISE, pb.TRAINING_MODE_GENERALISE: plan.GENERALISE}
MODE_PB = {v: k for k, v in MODES.items()}


def precheck(req: pb.CreateJobRequest) -> None:
    """What is wrong with the request whatever the dataset: the name, the mode, QLoRA."""
    registry.check_name(req.adapter_name)
    if req.mode not in MODES and req.mode != pb.TRAINING_MODE_UNSPECIFIED:
        raise InvalidArgument("mode", "unknown training mode")
    if req.qlora and not qlora_possible():
        raise FailedPrecondition("QLoRA needs a CUDA GPU and bitsandbytes; neither is available on this trainer")


def requested(req: pb.CreateJobRequest) -> plan.Requested:
    """The request's hyperparameters, None where unset (0): ``plan.choose`` fills those."""
    return plan.Requested(
        mode=MODES.get(req.mode),
        epochs=req.epochs or None,
        max_steps=req.max_steps,
        learning_rate=req.learning_rate or None,
        batch_size=req.batch_size or None,
        rank=req.lora.rank or None,
        alpha=req.lora.alpha or None,
        max_length=req.max_length or None,
    )


def params_of(req: pb.CreateJobRequest, chosen: plan.Plan) -> dict[str, Any]:
    """What the worker runs with (stored with the job as JSON): the plan's values and the
    request's other fields."""
    return {
        "adapter_name": req.adapter_name,
        "mode": chosen.mode,
        "rank": chosen.rank,
        "alpha": chosen.alpha,
        "dropout": req.lora.dropout,
        "target_modules": list(req.lora.target_modules),
        "epochs": chosen.epochs,
        "steps": chosen.steps,
        "max_steps": req.max_steps,
        "learning_rate": chosen.learning_rate,
        "batch_size": chosen.batch_size,
        "max_length": chosen.max_length,
        "seed": req.seed,
        "response_only_loss": req.response_only_loss if req.HasField("response_only_loss") else True,
        "qlora": req.qlora,
        "min_improvement": req.min_improvement,
        "plan": chosen.as_dict(),
        "summary": chosen.summary(),
    }


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
