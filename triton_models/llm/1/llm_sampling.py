"""Sampling of one row's next token under its own parameters and seeded generator.

A constrained row (row.constraint, llm_constraints.Matcher) samples only among the tokens its
grammar allows, is forced to EOS once the grammar is complete, and its matcher follows the
token picked here (the batcher accepts every token sample returns). Unconstrained rows of the
same batch are not touched.
"""

from __future__ import annotations

import torch
from llm_request import Row


def sample(row: Row, logits: torch.Tensor) -> int:
    """Grammar mask, repetition penalty, then greedy (temperature 0) or temperature / top-k / top-p."""
    matcher = row.constraint
    if matcher is None:
        return _pick(row, logits.float())
    tok = matcher.eos if matcher.done() else _pick(row, matcher.mask(logits.float()))
    matcher.consume(tok)
    return tok


def _pick(row: Row, logits: torch.Tensor) -> int:
    if row.repetition_penalty != 1.0 and row.seen is not None and row.seen.numel():
        picked = logits.index_select(0, row.seen)
        picked = torch.where(picked < 0, picked * row.repetition_penalty, picked / row.repetition_penalty)
        logits = logits.index_copy(0, row.seen, picked)
    if row.temperature == 0:
        return int(torch.argmax(logits).item())
    logits = logits / row.temperature
    if row.top_k and row.top_k < logits.numel():
        kth = torch.topk(logits, row.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if row.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        remove = cum - torch.softmax(sorted_logits, dim=-1) >= row.top_p
        remove[0] = False
        logits = logits.index_fill(0, order[remove], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=row.generator).item())
