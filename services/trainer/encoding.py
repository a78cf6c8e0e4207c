"""Chat examples -> training tensors, shared by training and evaluation.

The prompt is built exactly as ``triton_models/llm/1/model.py`` builds it for a
``messages_json`` request (the Chat RPC) and for a Generate prompt that is not raw: the
tokenizer's chat template over ``{"role", "content"}`` only, with the generation prompt,
tokenized without extra special tokens. The target is what the served model must then
generate: the last (assistant) message's tokens followed by the token the chat template
closes an assistant turn with (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3: found
by rendering the template, since it need not be ``eos``), where the server stops.

A tokenizer without a chat template trains in the ``raw`` prompt format: the prompt is the
messages' contents as they are (what a raw Generate sends), the target ends with eos. The
adapter records its format and serving applies the same. Prompt and target are tokenized
separately on purpose: serving tokenizes the prompt alone and the model emits the target
token by token after it, so joint tokenization could merge tokens across the boundary
that the model never sees at serving time.

An example is a sequence of ``{"role": ..., "content": ...}`` dicts: an optional system
message, alternating user/assistant turns, ending with the assistant target.

Heavy imports (torch) happen inside the functions, so the service can import this module
without loading the ML stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "IGNORE_INDEX",
    "CHAT",
    "RAW",
    "prompt_format",
    "end_of_turn_id",
    "prompt_text",
    "prompt_ids",
    "target_ids",
    "pad_token_id",
    "encode",
    "collate",
]

#: Label of positions that carry no loss (torch's cross-entropy ``ignore_index`` default).
IGNORE_INDEX = -100
#: Prompt formats: the chat template around the prompt, or the text as it is.
CHAT, RAW = "chat", "raw"
# Assistant content no template alters, to find what the template writes after it.
_PROBE = "llmesh end of turn probe"

Messages = Sequence[dict[str, Any]]


def _check(messages: Messages) -> None:
    if len(messages) < 2:
        raise ValueError("an example needs at least one message before the assistant target")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"message {i}: needs string 'role' and 'content'")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"the last message is the target and must be 'assistant', not {messages[-1]['role']!r}")


def prompt_format(tokenizer: Any) -> str:
    """``chat`` when the tokenizer has a chat template, else ``raw``."""
    return CHAT if getattr(tokenizer, "chat_template", None) else RAW


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that ends an assistant turn: the first special token the chat template
    writes after the assistant's content; eos without a template or when it writes none."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token: the model could never learn to stop")
    if prompt_format(tokenizer) == RAW:
        return int(eos)
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    text = str(tokenizer.apply_chat_template(turn, tokenize=False))
    _, found, after = text.rpartition(_PROBE)
    special = set(tokenizer.all_special_ids) | {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    for tok in tokenizer(after, add_special_tokens=False)["input_ids"] if found else []:
        if tok in special:
            return int(tok)
        if tokenizer.decode([tok]).strip():  # text before any special token: the template has none
            break
    return int(eos)


def prompt_text(tokenizer: Any, messages: Messages) -> str:
    """The exact prompt text the served model gets for this conversation (all but the target)."""
    _check(messages)
    # model.py forwards only role and content: extra keys (name, tool calls...) that a
    # template might render must not reach training either.
    history = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    if prompt_format(tokenizer) == RAW:
        return "\n\n".join(m["content"] for m in history)
    text = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    return str(text)


def prompt_ids(tokenizer: Any, messages: Messages) -> list[int]:
    """Prompt token ids as model.py computes them (the template already holds any BOS)."""
    return list(tokenizer(prompt_text(tokenizer, messages), add_special_tokens=False)["input_ids"])


def target_ids(tokenizer: Any, messages: Messages) -> list[int]:
    """The target's tokens followed by the end-of-turn token: the server stops there, so
    the model must learn it."""
    end = end_of_turn_id(tokenizer)
    content = messages[-1]["content"]
    return list(tokenizer(content, add_special_tokens=False)["input_ids"]) + [end]


def pad_token_id(tokenizer: Any) -> int:
    """The padding id model.py uses: the tokenizer's pad token, else eos (else 0)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


def _truncate(prompt: list[int], target: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Keep the end of the prompt and as much of the target as fits.

    The target has priority; when even it does not fit, its beginning is kept (the eos
    goes with the cut end: the answer was not finished) together with the last prompt
    token, so that every kept target token is predicted from something.
    """
    if len(prompt) + len(target) <= max_length:
        return prompt, target
    target = target[: max_length - 1]
    return prompt[max(0, len(prompt) - (max_length - len(target))) :], target


def encode(tokenizer: Any, messages: Messages, max_length: int, response_only: bool = True) -> dict[str, list[int]]:
    """``input_ids`` (prompt + target + eos, at most ``max_length``), ``labels`` (-100 on
    the prompt when ``response_only``) and ``attention_mask``."""
    if max_length < 2:
        raise ValueError("max_length must be >= 2 (one prompt token and one target token)")
    prompt, target = _truncate(prompt_ids(tokenizer, messages), target_ids(tokenizer, messages), max_length)
    input_ids = prompt + target
    labels = ([IGNORE_INDEX] * len(prompt) if response_only else list(prompt)) + target
    return {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}


def collate(batch: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into ``[batch, longest]`` long tensors (labels with -100)."""
    import torch

    if not batch:
        raise ValueError("empty batch")
    width = max(len(ex["input_ids"]) for ex in batch)
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    return {
        key: torch.tensor([ex[key] + [value] * (width - len(ex[key])) for ex in batch], dtype=torch.long)
        for key, value in fill.items()
    }
