"""Redis-backed rate limits (and request nonces) shared by all gateway replicas.

Two atomic Lua scripts (registered once per limiter with ``register_script``; redis-py
falls back from EVALSHA to EVAL by itself, e.g. after a Redis restart emptied the script
cache). Both read the clock with Redis ``TIME`` so replicas with skewed clocks agree.
``admit`` does everything one call needs in ONE round trip: claim the signature's
nonce (``SET NX EX``; a replay is refused before anything is counted), check the LLM
token bucket for generate calls, and count the request in its window. ``debit`` runs
the bucket script after a response reported its usage.

* Requests: a sliding-window log per (class, principal) in a sorted set
  ``llmesh:rl:req:<class>:<principal>`` (score = admit time in microseconds). Exact:
  at most ``Limit.requests`` admits in any ``Limit.window_s`` interval, across replicas;
  refused calls are not recorded; ``retry_after_s`` is the time until the oldest
  counted admit leaves the window. Memory is O(requests) per active key, fine for the
  per-principal limits a gateway uses (up to some thousands per window).
* LLM tokens: a token bucket per principal in a hash ``llmesh:rl:tok:<principal>``
  (capacity ``token_burst``, default ``tokens_per_minute``; refill
  ``tokens_per_minute``/60 per second). ``admit(..., tokens=True)`` and ``check_tokens``
  refuse while the bucket is empty (< 1 token) with the time until it holds one again;
  ``debit`` (after a response reports usage) subtracts what was used, possibly going
  negative (debt) but never below ``-capacity``. A missing key is a full bucket.

Every key gets a TTL (window + 1 s for requests, time-to-full + 1 s for buckets).

When Redis is unreachable (connection refused/reset, timeout after ``timeout_s``, still
loading, read-only replica) the per-class policy applies:

    class     when Redis is down   why
    read      open  (admit)        cheap, idempotent; availability first
    embed     open  (admit)        cheap, bounded by the model servers' own queues
    generate  open  (admit)        the user-facing path; Triton batches/queues protect GPUs
    write     closed (Unavailable) mutates state; abuse would be persistent
    job       closed (Unavailable) starts long, expensive work (training)
    admin     closed (Unavailable) privileged; never unmetered

``fail_open`` overrides entries of this table; classes not in it fail closed. Closed
raises ``Unavailable(..., retry_after_s=1)``. ``check_tokens`` follows the "generate"
policy; ``debit`` while Redis is down is dropped (logged). Nonces in fail-open classes
fall back to a bounded in-process set, so replays to the same replica are still
refused (a replay sent to ANOTHER replica while Redis is down is not: the ±skew
timestamp window bounds that exposure). After a failure the limiter
does not touch Redis for ``retry_interval_s`` (default 1 s, so a dead or blackholed Redis
costs no latency per call); then ONE call probes it (others keep applying the policy
until the probe ends): recovery is automatic and there is no other state (redis-py
reconnects its pool by itself). Every Redis call is bounded by ``timeout_s`` (0.5 s),
which also bounds redis-py's own retry/backoff loop (its default client retries a
refused connection with exponential backoff for seconds).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from redis import exceptions as redis_errors

from llmesh.runtime.errors import ResourceExhausted, Unauthenticated, Unavailable
from llmesh.services.gateway.settings import RATE_LIMIT_CLASSES

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

log = logging.getLogger(__name__)

PREFIX = "llmesh:rl:"
CLASSES = tuple(RATE_LIMIT_CLASSES.values())
DEFAULT_FAIL_OPEN: Mapping[str, bool] = {
    "read": True,
    "embed": True,
    "generate": True,
    "write": False,
    "job": False,
    "admin": False,
}

# Lua building blocks. Every script reads the clock with Redis TIME (``now``, in µs).
_CLOCK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
"""

# Sliding-window log: {admitted(0/1), remaining, retry_after_us}.
_WINDOW_FN = """
local function window(key, limit, win, member, now)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - win)
  local n = redis.call('ZCARD', key)
  if n < limit then
    redis.call('ZADD', key, now, member)
    redis.call('PEXPIRE', key, math.ceil(win / 1000) + 1000)
    return {1, limit - n - 1, 0}
  end
  local idx = n - limit
  local entry = redis.call('ZRANGE', key, idx, idx, 'WITHSCORES')
  local retry = tonumber(entry[2]) + win - now
  if retry < 1 then retry = 1 end
  return {0, 0, retry}
end
"""

# Token bucket (hash {tokens, ts}); rate in tokens per µs; debit 0 = check only.
# Returns {allowed(0/1), floor(tokens after), retry_after_us}.
_BUCKET_FN = """
local function bucket(key, capacity, rate, debit, now)
  local state = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(state[1])
  local ts = tonumber(state[2])
  if tokens == nil or ts == nil then
    tokens = capacity
  else
    local elapsed = now - ts
    if elapsed < 0 then elapsed = 0 end
    tokens = math.min(capacity, tokens + elapsed * rate)
  end
  if debit > 0 then
    tokens = math.max(-capacity, tokens - debit)
  end
  local allowed = 1
  local retry = 0
  if tokens < 1 then
    allowed = 0
    retry = math.ceil((1 - tokens) / rate)
  end
  if tokens >= capacity then
    redis.call('DEL', key)
  else
    redis.call('HSET', key, 'tokens', tostring(tokens), 'ts', tostring(now))
    redis.call('PEXPIRE', key, math.ceil((capacity - tokens) / rate / 1000) + 1000)
  end
  return {allowed, math.floor(tokens), retry}
end
"""

# Everything the gateway asks Redis about one call, in ONE round trip:
# KEYS: window zset, nonce key, token bucket.
# ARGV: limit, window_us, member, nonce ttl s (0: no nonce), bucket capacity (0: no
# token check), bucket refill per second.
# Returns {outcome, remaining, retry_after_us}; outcome 1 admitted, 0 over the request
# limit, 2 token budget empty, -1 replayed nonce. A replay is refused before anything
# is counted; the nonce stays claimed whatever happens next.
ADMIT_LUA = (
    _CLOCK
    + _WINDOW_FN
    + _BUCKET_FN
    + """
if tonumber(ARGV[4]) > 0 then
  if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[4]) then return {-1, 0, 0} end
end
local capacity = tonumber(ARGV[5])
if capacity > 0 then
  local b = bucket(KEYS[3], capacity, tonumber(ARGV[6]) / 1000000, 0, now)
  if b[1] == 0 then return {2, 0, b[3]} end
end
return window(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], now)
"""
)

# KEYS[1] hash; ARGV: capacity, refill per second, debit (0 = check only).
TOKEN_BUCKET_LUA = (
    _CLOCK
    + _BUCKET_FN
    + """
return bucket(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]) / 1000000, tonumber(ARGV[3]), now)
"""
)

# Redis errors that mean "the limiter backend is not usable right now".
# ConnectionError (incl. BusyLoadingError), TimeoutError, ReadOnlyError, and ResponseError
# such as MISCONF/OOM are all RedisError; OSError and asyncio.TimeoutError (our own
# ``timeout_s``) cover the transport.
_BACKEND_ERRORS: tuple[type[BaseException], ...] = (redis_errors.RedisError, OSError, asyncio.TimeoutError)


@dataclass(frozen=True)
class Limit:
    requests: int
    window_s: float


class _BackendDown(Exception):
    pass


class RateLimiter:
    def __init__(
        self,
        redis: Redis,
        limits: Mapping[str, Limit],
        *,
        fail_open: Mapping[str, bool] | None = None,
        tokens_per_minute: int | None = None,
        token_burst: int | None = None,
        timeout_s: float = 0.5,
        retry_interval_s: float = 1.0,
    ) -> None:
        for name, lim in limits.items():
            if lim.window_s <= 0 or lim.requests < 0:
                raise ValueError(f"bad limit for {name!r}: {lim}")
        if tokens_per_minute is not None and tokens_per_minute <= 0:
            raise ValueError("tokens_per_minute must be positive (or None to disable)")
        self._redis = redis
        self.limits = dict(limits)
        self.fail_open = {**DEFAULT_FAIL_OPEN, **(fail_open or {})}
        self.tokens_per_minute = tokens_per_minute
        self.token_capacity = token_burst if token_burst is not None else tokens_per_minute
        self.timeout_s = timeout_s
        self.retry_interval_s = retry_interval_s
        self._admit = redis.register_script(ADMIT_LUA)
        self._local_nonces: OrderedDict[str, float] = OrderedDict()
        self._bucket = redis.register_script(TOKEN_BUCKET_LUA)
        self._member_prefix = os.urandom(6).hex()
        self._seq = itertools.count()
        self._down_until = 0.0  # monotonic time before which Redis is not tried; 0 = healthy
        self._probing = False

    # ---- backend ----------------------------------------------------------------------

    async def _run(self, script: AsyncScript, keys: list[str], args: list[str | int | float]) -> list[int]:
        probing = False
        if self._down_until:
            # Marked down: skip Redis until retry_interval_s has passed, then let exactly
            # one call probe it (the others keep applying the fail policy meanwhile).
            if time.monotonic() < self._down_until or self._probing:
                raise _BackendDown("redis marked down")
            probing = self._probing = True
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await script(keys=keys, args=args)
        except _BACKEND_ERRORS as e:
            if not self._down_until:
                log.warning("rate limiter: redis unavailable (%s: %s)", type(e).__name__, e)
            self._down_until = time.monotonic() + self.retry_interval_s
            raise _BackendDown(str(e)) from e
        finally:
            if probing:
                self._probing = False
        if self._down_until:
            log.warning("rate limiter: redis is back")
            self._down_until = 0.0
        return [int(x) for x in result]

    def _fail(self, klass: str, what: str) -> None:
        """Apply the class's fail policy: return (open) or raise Unavailable (closed)."""
        if self.fail_open.get(klass, False):
            return
        raise Unavailable(f"rate limiter unavailable; refusing {what}", retry_after_s=1.0)

    @property
    def backend_down(self) -> bool:
        """True from a failed Redis call until the next successful one."""
        return self._down_until != 0.0

    # ---- request limits -----------------------------------------------------------------

    def key(self, principal: str, klass: str) -> str:
        return f"{PREFIX}req:{klass}:{principal}"

    async def admit(
        self, principal: str, klass: str, *, nonce_key: str | None = None, nonce_ttl_s: int = 0, tokens: bool = False
    ) -> None:
        """Count one call of class ``klass`` for ``principal`` — in the same Redis round
        trip, claim the request's nonce (``nonce_key``, kept ``nonce_ttl_s``) and, with
        ``tokens``, check the principal's LLM token bucket. Raises ``Unauthenticated``
        for a replayed nonce, ``ResourceExhausted`` (with retry-after) over a limit.

        While Redis is down the class policy applies; in fail-open classes nonces are
        checked against this replica's own memory (``LOCAL_NONCES``, bounded), so a
        replay to the same replica is still refused."""
        limit = self.limits.get(klass)
        if limit is None:
            raise ValueError(f"no rate limit configured for class {klass!r}")
        if limit.requests == 0:
            raise ResourceExhausted(
                f"rate limit for {klass} calls is 0", retry_after_s=limit.window_s, metadata={"quota_class": klass}
            )
        member = f"{self._member_prefix}:{next(self._seq)}"
        window_us = max(1, int(limit.window_s * 1_000_000))
        check_tokens = tokens and self.tokens_per_minute is not None
        try:
            outcome, _remaining, retry_us = await self._run(
                self._admit,
                [self.key(principal, klass), nonce_key or f"{PREFIX}none", self.token_key(principal)],
                [
                    limit.requests,
                    window_us,
                    member,
                    nonce_ttl_s if nonce_key else 0,
                    (self.token_capacity or 0) if check_tokens else 0,
                    (self.tokens_per_minute or 0) / 60.0,
                ],
            )
        except _BackendDown:
            self._fail(klass, f"{klass} calls")
            if nonce_key and not self._claim_locally(nonce_key, nonce_ttl_s):
                raise Unauthenticated("replayed nonce") from None
            return
        retry = max(0.001, math.ceil(retry_us / 1000) / 1000)
        if outcome == -1:
            raise Unauthenticated("replayed nonce")
        if outcome == 2:
            raise ResourceExhausted(
                f"LLM token budget exhausted ({self.tokens_per_minute} tokens/min); retry in {retry:.3f}s",
                retry_after_s=retry,
                metadata={"quota_class": "tokens", "quota_limit": str(self.tokens_per_minute)},
            )
        if outcome == 0:
            raise ResourceExhausted(
                f"rate limit exceeded for {klass} calls: {limit.requests} per {limit.window_s:g}s; "
                f"retry in {retry:.3f}s",
                retry_after_s=retry,
                metadata={"quota_class": klass, "quota_limit": str(limit.requests)},
            )

    LOCAL_NONCES = 100_000

    def _claim_locally(self, nonce_key: str, ttl_s: int) -> bool:
        now = time.monotonic()
        while self._local_nonces and next(iter(self._local_nonces.values())) < now:
            self._local_nonces.popitem(last=False)  # insertion order = expiry order (same ttl)
        if nonce_key in self._local_nonces:
            return False
        self._local_nonces[nonce_key] = now + ttl_s
        if len(self._local_nonces) > self.LOCAL_NONCES:
            self._local_nonces.popitem(last=False)
        return True

    # ---- LLM token bucket -----------------------------------------------------------------

    def token_key(self, principal: str) -> str:
        return f"{PREFIX}tok:{principal}"

    async def _bucket_call(self, principal: str, debit: int) -> tuple[bool, int, int]:
        assert self.tokens_per_minute is not None and self.token_capacity is not None
        allowed, tokens, retry_us = await self._run(
            self._bucket,
            [self.token_key(principal)],
            [self.token_capacity, self.tokens_per_minute / 60.0, debit],
        )
        return bool(allowed), tokens, retry_us

    async def check_tokens(self, principal: str) -> int | None:
        """Before a generate call: raise ResourceExhausted while the principal's token
        bucket is empty. Returns the whole tokens left (None when not limited/unknown)."""
        if self.tokens_per_minute is None:
            return None
        try:
            allowed, tokens, retry_us = await self._bucket_call(principal, 0)
        except _BackendDown:
            self._fail("generate", "generate calls (token budget unknown)")
            return None
        if not allowed:
            retry = max(0.001, math.ceil(retry_us / 1000) / 1000)
            raise ResourceExhausted(
                f"LLM token budget exhausted ({self.tokens_per_minute} tokens/min); retry in {retry:.3f}s",
                retry_after_s=retry,
                metadata={"quota_class": "tokens", "quota_limit": str(self.tokens_per_minute)},
            )
        return tokens

    async def debit(self, principal: str, tokens: int) -> int | None:
        """After a response reported ``tokens`` used: take them from the bucket (may go
        into debt down to -capacity). Returns the whole tokens left; None when not
        limited or Redis is down (the debit is dropped)."""
        if self.tokens_per_minute is None or tokens <= 0:
            return None
        try:
            _allowed, left, _retry = await self._bucket_call(principal, int(tokens))
        except _BackendDown:
            log.warning("rate limiter: dropped debit of %d tokens (redis unavailable)", tokens)
            return None
        return left
