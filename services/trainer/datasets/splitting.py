"""The seeded train/eval split of a dataset's examples."""

from __future__ import annotations

import math
import random

from llmesh.runtime.errors import InvalidArgument
from llmesh.services.trainer.datasets.examples import Example


def split(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval): a seeded shuffle, then the first round(n * fraction) go to eval."""
    if not (isinstance(eval_fraction, (int, float)) and math.isfinite(eval_fraction) and 0 <= eval_fraction <= 0.5):
        raise InvalidArgument("eval_fraction", f"must be between 0 and 0.5, got {eval_fraction}")
    n = len(examples)
    order = list(range(n))
    random.Random(seed).shuffle(order)  # Random(int) + shuffle are stable across runs and versions
    k = 0
    if eval_fraction > 0 and n >= 2:
        k = min(max(1, round(n * eval_fraction)), n - 1)  # eval is never empty, train never is
    return [examples[i] for i in order[k:]], [examples[i] for i in order[:k]]
