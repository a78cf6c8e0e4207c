"""Evaluation of a (LoRA-adapted) causal LM on held-out chat examples, and the loss plot.

Loss uses the very tensors training uses (``encoding.encode``); generation starts from the
very prompt serving builds (``encoding.prompt_ids``) and stops at the same eos ids as
``triton_models/llm/1/model.py``, so the scores describe what the served adapter will say.

Heavy imports (torch, matplotlib) happen inside the functions.
"""

from __future__ import annotations

import io
import math
import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmesh.runtime.files import write_atomic
from llmesh.services.trainer.encoding import IGNORE_INDEX, collate, encode, end_of_turn_id, pad_token_id, prompt_ids

__all__ = ["Metrics", "rouge_l", "exact_match", "evaluate", "held_out_loss", "loss_curve_png"]

#: Perplexity is exp of at most this: exp(80) ~ 5.5e34 still fits the float32 of the
#: Job/Adapter ``eval_metrics`` map, where a diverged run would otherwise report inf.
MAX_LOG_PERPLEXITY = 80.0

# CJK radicals/symbols, kana, bopomofo, Han (+ ext. A), Hangul, compatibility ideographs,
# Han ext. B+: scripts written without spaces, so whitespace tokens would be whole sentences.
_CJK = re.compile("[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003ffff]")


# --------------------------------------------------------------------------- text scores


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def _tokens(text: str, chars: bool) -> list[str]:
    return [c for c in text if not c.isspace()] if chars else text.split()


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (one DP row, O(len(a) * len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diag = 0  # row[j - 1] of the previous pass
        for j, y in enumerate(b, 1):
            diag, row[j] = row[j], diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (LCS-based) after NFKC + case folding.

    Character tokens (whitespace dropped) when either text contains CJK, whitespace tokens
    otherwise. Texts without tokens: both -> 1.0, one -> 0.0.
    """
    pred, ref = _fold(prediction), _fold(reference)
    chars = bool(_CJK.search(pred) or _CJK.search(ref))
    p, r = _tokens(pred, chars), _tokens(ref, chars)
    if not p or not r:
        return float(not p and not r)
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch).startswith("P")


def _normalize(text: str) -> str:
    """NFKC, case folding, whitespace collapsed, punctuation and spaces trimmed at both ends."""
    text = " ".join(_fold(text).split())
    start, end = 0, len(text)
    while start < end and (_is_punct(text[start]) or text[start].isspace()):
        start += 1
    while end > start and (_is_punct(text[end - 1]) or text[end - 1].isspace()):
        end -= 1
    return text[start:end]


def exact_match(prediction: str, reference: str) -> bool:
    """Equal after NFKC, case folding, collapsing whitespace and stripping surrounding punctuation."""
    return _normalize(prediction) == _normalize(reference)


# --------------------------------------------------------------------------- model scores


@dataclass(frozen=True)
class Metrics:
    """Means over the examples; ``loss`` is per response token, ``perplexity`` = exp(loss), capped."""

    loss: float
    perplexity: float
    rouge_l: float
    exact_match: float
    examples: int

    def as_dict(self) -> dict[str, float]:
        """For the ``eval_metrics`` maps of Job and Adapter."""
        return {k: float(v) for k, v in asdict(self).items()}


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The ids model.py stops at: the tokenizer's eos and the generation config's, and the
    end-of-turn token training appends (the same one for ChatML; Llama 3 lists it in its
    generation config)."""
    ids: set[int] = {end_of_turn_id(tokenizer)}
    config = getattr(model, "generation_config", None)
    for src in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(x) for x in src)
    return sorted(ids)


def _loss_sum(
    model: Any, tokenizer: Any, batch: Sequence[Sequence[dict[str, Any]]], max_length: int
) -> tuple[float, int]:
    """Summed cross-entropy over the response tokens of a batch, and their count."""
    import torch.nn.functional as F

    t = collate([encode(tokenizer, ex, max_length) for ex in batch], pad_token_id(tokenizer))
    t = {k: v.to(_device(model)) for k, v in t.items()}
    logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
    # position i predicts token i + 1; summed here (not HF's per-batch mean) so that the
    # result is the mean over all response tokens whatever the batching
    labels = t["labels"][:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return float(loss), int((labels != IGNORE_INDEX).sum())


def _generate(
    model: Any, tokenizer: Any, batch: Sequence[Sequence[dict[str, Any]]], max_length: int, max_new_tokens: int
) -> list[str]:
    """Greedy completions of the served prompts (left-padded, end kept when too long)."""
    import torch

    prompts = [prompt_ids(tokenizer, ex)[-max_length:] for ex in batch]
    width = max(len(p) for p in prompts)
    pad = pad_token_id(tokenizer)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    eos = _eos_ids(model, tokenizer)
    out = model.generate(
        input_ids=ids.to(_device(model)),
        attention_mask=mask.to(_device(model)),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    texts: list[str] = []
    for row in out[:, width:].tolist():
        end = next((i for i, tok in enumerate(row) if tok in eos), len(row))
        # special tokens carry no text in model.py either; no space clean-up: bytes as generated
        texts.append(tokenizer.decode(row[:end], skip_special_tokens=True, clean_up_tokenization_spaces=False))
    return texts


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Sequence[dict[str, Any]]],
    *,
    max_length: int = 512,
    max_new_tokens: int = 64,
    batch_size: int = 8,
) -> Metrics:
    """Teacher-forced loss on the response tokens and greedy generation scored against the
    target (ROUGE-L, exact match). Works for a plain model and a PeftModel; the model's
    train/eval mode is restored afterwards."""
    import torch

    if not examples:
        raise ValueError("no examples to evaluate")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    was_training = model.training
    model.eval()
    loss_sum, tokens, predictions = 0.0, 0, []
    try:
        # no_grad rather than inference_mode: evaluation runs between training steps, and
        # inference tensors cached by a module (e.g. rotary tables) would break the next backward
        with torch.no_grad():
            for batch in _batches(examples, batch_size):
                s, n = _loss_sum(model, tokenizer, batch, max_length)
                loss_sum, tokens = loss_sum + s, tokens + n
                predictions += _generate(model, tokenizer, batch, max_length, max_new_tokens)
    finally:
        model.train(was_training)
    loss = loss_sum / max(tokens, 1)
    references = [ex[-1]["content"] for ex in examples]
    return Metrics(
        loss=loss,
        perplexity=math.exp(min(loss, MAX_LOG_PERPLEXITY)),
        rouge_l=sum(map(rouge_l, predictions, references)) / len(examples),
        exact_match=sum(map(exact_match, predictions, references)) / len(examples),
        examples=len(examples),
    )


def held_out_loss(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Sequence[dict[str, Any]]],
    *,
    max_length: int = 512,
    batch_size: int = 8,
) -> float:
    """Teacher-forced loss per response token (no generation: cheap enough to run every
    few steps for early stopping); the model's train/eval mode is restored afterwards."""
    import torch

    if not examples:
        raise ValueError("no examples to evaluate")
    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    try:
        with torch.no_grad():  # not inference_mode: see evaluate()
            for batch in _batches(examples, batch_size):
                s, n = _loss_sum(model, tokenizer, batch, max_length)
                loss_sum, tokens = loss_sum + s, tokens + n
    finally:
        model.train(was_training)
    return loss_sum / max(tokens, 1)


# --------------------------------------------------------------------------- plot


def loss_curve_png(
    train: Sequence[tuple[int, float]], evals: Sequence[tuple[int, float]], path: Path, title: str
) -> None:
    """Training loss per step with eval-loss markers, written atomically as a PNG."""
    # The Agg canvas directly, not pyplot: no global figure state, safe from job threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for points, style, label in ((train, "-", "train"), (evals, "o", "eval")):
        finite = [(s, v) for s, v in points if math.isfinite(v)]  # a diverged step would wreck the scale
        if finite:
            ax.plot([s for s, _ in finite], [v for _, v in finite], style, label=label)
    if ax.lines:
        ax.legend()
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_atomic(Path(path), buf.getvalue())
