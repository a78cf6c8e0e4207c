"""One chat turn against its stored conversation: which system prompt applies, which
earlier turns fit the prompt budget, and storing the turn once the reply is complete."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from llmesh.services.inference.llm_backend import Chunk, GenerationInput, LlmBackend
from llmesh.services.inference.memory import ChatMemory, History, Message
from llmesh.services.inference.sampling import Sampling


def fit_history(past: Sequence[Message], budget: int) -> list[Message]:
    """The newest messages whose contents total at most ``budget`` characters, dropping
    the oldest whole turns (user + assistant) first so the history never starts mid-turn."""
    start, total = 0, sum(len(m.content) for m in past)
    while start < len(past) and total > budget:
        total -= sum(len(m.content) for m in past[start : start + 2])
        start += 2
    return list(past[start:])


def turn_messages(
    history: History | None, message: str, system_prompt: str, max_prompt_chars: int
) -> list[dict[str, str]]:
    """The chat messages for the model: the request's system prompt (or the stored one),
    the earlier turns that fit beside it and the new message, then the new message."""
    system = system_prompt or (history.system if history else "")
    past = fit_history(history.messages if history else [], max_prompt_chars - len(message) - len(system))
    return (
        ([{"role": "system", "content": system}] if system else [])
        + [{"role": m.role, "content": m.content} for m in past]
        + [{"role": "user", "content": message}]
    )


class ChatTurns:
    def __init__(self, llm: LlmBackend, memory: ChatMemory, max_prompt_chars: int) -> None:
        self.llm = llm
        self.memory = memory
        self.max_prompt_chars = max_prompt_chars

    async def stream(
        self,
        tenant: str,
        cid: str,
        message: str,
        system_prompt: str,
        sampling: Sampling,
        adapter: str,
        timeout: float,
        response_format: str = "",
    ) -> AsyncIterator[tuple[Chunk, int]]:
        """Streams one turn as (chunk, messages kept); the turn is stored before the final
        chunk is yielded, and the count is set on that chunk only (0 before)."""
        history = await self.memory.load(tenant, cid)
        messages = turn_messages(history, message, system_prompt, self.max_prompt_chars)
        inp = GenerationInput(sampling, messages=messages, adapter=adapter, response_format=response_format)
        text: list[str] = []
        async for c in self.llm.stream(inp, timeout=timeout):
            text.append(c.text)
            if c.finish_reason:
                kept = await self.memory.append_turn(tenant, cid, message, "".join(text), system_prompt or None)
                yield c, kept
            else:
                yield c, 0
