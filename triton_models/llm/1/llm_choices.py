"""Choice lists are scored exactly, not decoded: P(choice | prompt) for every choice.

For a choice row the batcher hands the row here instead of prefilling it (Batcher._admit). One
teacher-forced forward over prompt + choice + end-of-turn for all choices (left-padded, in
chunks to bound the logits kept) gives log P(choice) as the sum of its tokens' log-probs; the
end token makes "yes" and "yes please" different answers. A softmax over the choices gives
their probabilities (what a router uses as its confidence); the answer is the most probable
at temperature 0, else drawn from those probabilities with the row's seeded generator.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any

import torch
from llm_adapters import AdapterCache
from llm_errors import internal
from llm_request import Row
from llm_responses import send_error

CHUNK = 8  # sequences per forward: bounds the kept logits to CHUNK x (longest choice + 1) x vocab


def is_choice(row: Row) -> bool:
    return row.response_format is not None and row.response_format.get("type") == "choice"


class ChoiceScorer:
    def __init__(self, tokenizer: Any, adapters: AdapterCache, pad_id: int) -> None:
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.pad_id = pad_id
        eos = tokenizer.eos_token_id  # the chat template's end of turn (<|im_end|> for ChatML)
        self.end_id = int(eos if eos is not None else pad_id)
        fwd = inspect.signature(adapters.model.forward).parameters
        self.keep_kw = "logits_to_keep" if "logits_to_keep" in fwd else None

    def divert(self, rows: list[Row], finalize: Callable[[Row], None]) -> list[Row]:
        """Score and finish the choice rows of `rows`; returns the others (to be decoded)."""
        rest: list[Row] = []
        for r in rows:
            if not is_choice(r):
                rest.append(r)
                continue
            try:
                self.answer(r)
            except Exception as exc:  # one row's failure is its own
                send_error(r, internal(exc))
                continue
            finalize(r)
        return rest

    def choice_ids(self, row: Row, choice: str) -> list[int]:
        """The choice's tokens as the model would see them after this prompt: tokenized with
        the prompt when that keeps the prompt's tokens (BPE may merge across the boundary),
        else on its own."""
        whole = list(self.tokenizer(row.prompt_text + choice, add_special_tokens=False)["input_ids"])
        n = len(row.prompt_ids)
        if whole[:n] == row.prompt_ids and len(whole) > n:
            return whole[n:]
        return list(self.tokenizer(choice, add_special_tokens=False)["input_ids"])

    def log_probs(self, row: Row, choices: list[str]) -> list[float]:
        """log P(choice + end | prompt) for each choice."""
        seqs = [self.choice_ids(row, c) + [self.end_id] for c in choices]
        out: list[float] = []
        for i in range(0, len(seqs), CHUNK):
            out.extend(self._score(row, seqs[i : i + CHUNK]))
        return out

    def _score(self, row: Row, tails: list[list[int]]) -> list[float]:
        prompt = row.prompt_ids
        full = [prompt + t for t in tails]
        width = max(len(s) for s in full)
        keep = max(len(t) for t in tails) + 1  # positions whose logits predict a tail token
        n = len(full)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, s in enumerate(full):
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {}
        if self.keep_kw:
            kwargs[self.keep_kw] = keep
        names = self.adapters.adapter_names([row.adapter] * n)
        if names is not None:
            kwargs["adapter_names"] = names
        out = self.adapters.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **kwargs)
        logits = out.logits[:, -keep:, :].float()  # [n, keep, vocab]; position j predicts j + 1
        logp = torch.log_softmax(logits[:, :-1, :], dim=-1)
        scores: list[float] = []
        for i, t in enumerate(tails):
            rows = logp[i, keep - 1 - len(t) :, :]  # the last len(t) predictions of row i
            scores.append(float(rows.gather(1, torch.tensor(t, dtype=torch.long).unsqueeze(1)).sum()))
        return scores

    def answer(self, row: Row) -> None:
        """Score the row's choices, pick its answer, fill text / finish / structured."""
        assert row.response_format is not None
        choices: list[str] = list(row.response_format["choices"])
        probs = torch.softmax(torch.tensor(self.log_probs(row, choices), dtype=torch.float64), 0)
        if row.temperature == 0:
            pick = int(torch.argmax(probs))
        else:
            pick = int(torch.multinomial(probs.float(), 1, generator=row.generator))
        order = sorted(range(len(choices)), key=lambda k: -float(probs[k]))
        row.text = choices[pick]
        row.generated = self.choice_ids(row, choices[pick]) + [self.end_id]
        row.finish = "stop"
        row.structured = json.dumps(
            {
                "valid": True,
                "choices": [{"choice": choices[k], "probability": float(probs[k])} for k in order],
            },
            ensure_ascii=False,
        )
