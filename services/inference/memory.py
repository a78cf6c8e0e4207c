"""Chat memory in Redis: one bounded list per conversation, with a sliding TTL.

A turn is appended atomically (MULTI/EXEC: push both messages, trim to the
bound, refresh the TTL) before the reply is acknowledged to the client.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar
from urllib.parse import quote

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from llmesh.runtime.errors import InvalidArgument, Unavailable

CONVERSATION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
PREFIX = "llmesh:chat:"
P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str

    def to_json(self) -> str:
        return json.dumps({"role": self.role, "content": self.content}, ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Message:
        d = json.loads(raw)
        return cls(d["role"], d["content"])


@dataclass(frozen=True)
class History:
    system: str
    messages: list[Message]
    ttl_seconds: int


def new_conversation_id() -> str:
    return uuid.uuid4().hex


def check_conversation_id(cid: str, field: str = "conversation_id") -> str:
    if not CONVERSATION_ID.match(cid):
        raise InvalidArgument(field, "must match [A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
    return cid


def _redis_errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Redis down or slow is UNAVAILABLE (retry later), never INTERNAL."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            raise Unavailable(f"conversation store unavailable: {e}", retry_after_s=1.0) from e

    return wrapper


class ChatMemory:
    def __init__(self, client: aioredis.Redis, *, max_messages: int, ttl_seconds: int) -> None:
        self._r = client
        self.max_messages = max_messages
        self.ttl_seconds = ttl_seconds

    @classmethod
    def from_url(cls, url: str, *, max_messages: int, ttl_seconds: int) -> ChatMemory:
        client = aioredis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=1.0)
        return cls(client, max_messages=max_messages, ttl_seconds=ttl_seconds)

    def _keys(self, tenant: str, cid: str) -> tuple[str, str]:
        # Conversations live under their tenant: an id guessed or leaked from another
        # tenant names a different key, so it reads as "not found".
        base = f"{PREFIX}{quote(tenant, safe='')}:{cid}"
        return f"{base}:messages", f"{base}:system"

    @_redis_errors
    async def ping(self) -> None:
        await self._r.ping()

    @_redis_errors
    async def load(self, tenant: str, cid: str) -> History | None:
        mkey, skey = self._keys(tenant, cid)
        async with self._r.pipeline(transaction=True) as p:
            p.lrange(mkey, 0, -1)
            p.get(skey)
            p.ttl(mkey)
            p.ttl(skey)
            raw, system, ttl_m, ttl_s = await p.execute()
        if not raw and system is None:
            return None
        return History(
            system=system.decode() if system else "",
            messages=[Message.from_json(x) for x in raw],
            ttl_seconds=max(0, max(ttl_m, ttl_s)),
        )

    @_redis_errors
    async def append_turn(self, tenant: str, cid: str, user: str, assistant: str, system: str | None) -> int:
        """Store one completed turn; returns how many messages are kept."""
        mkey, skey = self._keys(tenant, cid)
        async with self._r.pipeline(transaction=True) as p:
            p.rpush(mkey, Message("user", user).to_json(), Message("assistant", assistant).to_json())
            # Trim whole turns (user + assistant) so history never starts mid-turn.
            p.ltrim(mkey, -(self.max_messages - self.max_messages % 2), -1)
            p.expire(mkey, self.ttl_seconds)
            if system is not None:
                p.set(skey, system, ex=self.ttl_seconds)
            else:
                p.expire(skey, self.ttl_seconds)
            p.llen(mkey)
            res = await p.execute()
        return int(res[-1])

    @_redis_errors
    async def delete(self, tenant: str, cid: str) -> bool:
        return bool(await self._r.delete(*self._keys(tenant, cid)))

    async def close(self) -> None:
        await self._r.aclose()
