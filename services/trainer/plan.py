"""What a training job runs with when the request leaves fields unset: chosen by the data.

Two modes. A small dataset (fewer than ``MEMORISE_BELOW`` rows: a FAQ) is for memorising:
every row is trained on (no held-out split), for at least ``MEMORISE_MIN_STEPS`` optimizer
steps, and the job's evaluation is the share of training answers reproduced exactly by
greedy decoding (pass: ``PASS_EXACT_MATCH``). A larger dataset is for generalising: the
dataset's held-out split is evaluated every ``eval_every_steps`` and training stops after
``PATIENCE`` evaluations without held-out improvement, keeping the best adapter.

The numbers were chosen by measurement on SmolLM2-135M-Instruct on 2 CPU cores (see
docs/training.md, "Defaults"); values the request sets explicitly always win.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

MEMORISE = "memorise"
GENERALISE = "generalise"
MODES = (MEMORISE, GENERALISE)

#: Rows below which a dataset is memorised rather than generalised from.
MEMORISE_BELOW = 50
#: Memorise: at least this many optimizer steps (or 3 epochs, whichever is more).
MEMORISE_MIN_STEPS = 150
MEMORISE_MIN_EPOCHS = 3
MEMORISE_LR = 1e-3
MEMORISE_BATCH = 1
#: Memorise: pass = at least this share of training answers reproduced exactly.
PASS_EXACT_MATCH = 0.9

GENERALISE_EPOCHS = 3
GENERALISE_LR = 5e-4
GENERALISE_BATCH = 8
#: Generalise: held-out evaluations per epoch, and how many without improvement stop the job.
EVALS_PER_EPOCH = 4
PATIENCE = 2

RANK = 16
MAX_LENGTH = 512


@dataclass(frozen=True)
class Requested:
    """The request's hyperparameters; None (or 0 for max_steps) where it left them unset."""

    mode: str | None = None
    epochs: int | None = None
    max_steps: int = 0
    learning_rate: float | None = None
    batch_size: int | None = None
    rank: int | None = None
    alpha: float | None = None
    max_length: int | None = None


@dataclass(frozen=True)
class Plan:
    mode: str
    train_examples: int
    held_out_examples: int
    steps: int
    epochs: int
    learning_rate: float
    rank: int
    alpha: float
    batch_size: int
    max_length: int
    eval_every_steps: int
    patience: int
    pass_exact_match: float
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line for the job's events: what was chosen, then why."""
        split = f"{self.held_out_examples} held out" if self.held_out_examples else "no held-out split"
        stop = f", early stopping after {self.patience} evaluations" if self.patience else ""
        return (
            f"{self.mode}: {self.steps} steps ({self.epochs} epochs) over {self.train_examples} rows, {split}{stop}; "
            f"lr {self.learning_rate:g}, LoRA r={self.rank}, batch {self.batch_size} ({self.reason})"
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        return cls(**d)


def choose(req: Requested, train_rows: int, held_out_rows: int) -> Plan:
    """The plan for a dataset of ``train_rows`` + ``held_out_rows`` (its stored split)."""
    rows = train_rows + held_out_rows
    if req.mode is not None:
        mode, why = req.mode, f"{req.mode} as requested ({rows} rows)"
    elif rows < MEMORISE_BELOW:
        mode, why = MEMORISE, f"{rows} rows < {MEMORISE_BELOW}: memorise every answer, no held-out split"
    else:
        mode, why = GENERALISE, f"{rows} rows >= {MEMORISE_BELOW}: generalise, early stopping on the held-out split"
    if mode == GENERALISE and held_out_rows == 0:
        # nothing to stop on: the dataset was stored without a split (too small to have one)
        mode, why = MEMORISE, f"{why}; the dataset has no held-out rows, so memorise"
    memorise = mode == MEMORISE
    train = rows if memorise else train_rows
    batch = req.batch_size or (MEMORISE_BATCH if memorise else GENERALISE_BATCH)
    per_epoch = math.ceil(train / batch)
    if req.epochs:
        epochs = req.epochs
        steps = per_epoch * epochs
    elif memorise:
        steps = max(MEMORISE_MIN_STEPS, MEMORISE_MIN_EPOCHS * per_epoch)
        epochs = math.ceil(steps / per_epoch)
        why += f"; {steps} steps (at least {MEMORISE_MIN_STEPS} or {MEMORISE_MIN_EPOCHS} epochs)"
    else:
        epochs = GENERALISE_EPOCHS
        steps = per_epoch * epochs
    if req.max_steps:
        steps = min(steps, req.max_steps)
    rank = req.rank or RANK
    return Plan(
        mode=mode,
        train_examples=train,
        held_out_examples=0 if memorise else held_out_rows,
        steps=steps,
        epochs=epochs,
        learning_rate=req.learning_rate or (MEMORISE_LR if memorise else GENERALISE_LR),
        rank=rank,
        alpha=req.alpha or 2.0 * rank,
        batch_size=batch,
        max_length=req.max_length or MAX_LENGTH,
        eval_every_steps=0 if memorise else max(1, per_epoch // EVALS_PER_EPOCH),
        patience=0 if memorise else PATIENCE,
        pass_exact_match=PASS_EXACT_MATCH if memorise else 0.0,
        reason=why,
    )
