"""Redis-backed rate limits against a REAL redis-server on a free loopback port: exact
limits across replicas under concurrency, retry-after, token bucket, TTLs, fail-open /
fail-closed while Redis is down, and recovery after Redis restarts on the same port."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from llmesh.runtime.errors import ResourceExhausted, Unauthenticated, Unavailable
from llmesh.services.gateway.ratelimit import DEFAULT_FAIL_OPEN, Limit, RateLimiter
from tests.support.sandbox import RedisServer


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    s = RedisServer()
    s.start()
    yield s
    s.stop()


@pytest.fixture
async def r(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(host="127.0.0.1", port=server.port)
    await client.flushall()
    yield client
    await client.aclose()


LIMITS = {k: Limit(5, 2.0) for k in ("read", "write", "generate", "embed", "job", "admin")}


async def outcome(lim: RateLimiter, principal: str, klass: str) -> bool:
    try:
        await lim.admit(principal, klass)
        return True
    except ResourceExhausted:
        return False


def _down(lim: RateLimiter) -> bool:
    return lim.backend_down


async def test_limit_and_retry_after(r: aioredis.Redis) -> None:
    lim = RateLimiter(r, LIMITS)
    t0 = time.monotonic()
    for _ in range(5):
        await lim.admit("alice", "write")
    with pytest.raises(ResourceExhausted) as e:
        await lim.admit("alice", "write")
    elapsed = time.monotonic() - t0
    assert 2.0 - elapsed - 0.1 <= e.value.retry_after_s <= 2.0
    assert "write" in e.value.message and e.value.metadata["quota_class"] == "write"
    # others are independent: another principal, another class
    await lim.admit("bob", "write")
    await lim.admit("alice", "read")


async def test_window_slides(r: aioredis.Redis) -> None:
    lim = RateLimiter(r, {"read": Limit(3, 0.3)})
    for _ in range(3):
        await lim.admit("p", "read")
    with pytest.raises(ResourceExhausted) as e:
        await lim.admit("p", "read")
    assert 0 < e.value.retry_after_s <= 0.3
    await asyncio.sleep(e.value.retry_after_s + 0.01)
    await lim.admit("p", "read")  # the oldest admit left the window
    # refusals are not counted: after a full window all 3 slots are back
    await asyncio.sleep(0.31)
    for _ in range(3):
        await lim.admit("p", "read")


async def test_limit_holds_across_replicas_under_concurrency(server: RedisServer, r: aioredis.Redis) -> None:
    r2 = aioredis.Redis(host="127.0.0.1", port=server.port)  # a second gateway replica
    try:
        limits = {"generate": Limit(30, 10.0)}
        a, b = RateLimiter(r, limits), RateLimiter(r2, limits)
        results = await asyncio.gather(*(outcome(lim, "carol", "generate") for _ in range(40) for lim in (a, b)))
        assert sum(results) == 30 and len(results) == 80
    finally:
        await r2.aclose()


async def test_keys_have_ttls(r: aioredis.Redis) -> None:
    lim = RateLimiter(r, {"read": Limit(10, 2.0)}, tokens_per_minute=600)
    await lim.admit("dave", "read")
    await lim.debit("dave", 100)
    keys = sorted(k.decode() if isinstance(k, bytes) else k for k in await r.keys("*"))
    assert keys == ["llmesh:rl:req:read:dave", "llmesh:rl:tok:dave"]
    assert 2000 < await r.pttl("llmesh:rl:req:read:dave") <= 3000
    # 100 tokens at 10/s refill in 10 s (+1 s slack)
    assert 9000 < await r.pttl("llmesh:rl:tok:dave") <= 11000


async def test_token_bucket_debit_and_refill(r: aioredis.Redis) -> None:
    lim = RateLimiter(r, LIMITS, tokens_per_minute=6000)  # 100 tokens/s, capacity 6000
    assert await lim.check_tokens("erin") == 6000
    left = await lim.debit("erin", 5000)
    assert left is not None and 1000 <= left <= 1001
    await lim.check_tokens("erin")
    left = await lim.debit("erin", 1050)  # the response used more than was left: debt
    assert left is not None and -50 <= left < -40
    with pytest.raises(ResourceExhausted) as e:
        await lim.check_tokens("erin")
    assert 0.3 < e.value.retry_after_s <= 0.52
    assert e.value.metadata["quota_class"] == "tokens"
    await asyncio.sleep(e.value.retry_after_s + 0.02)
    refilled = await lim.check_tokens("erin")
    assert refilled is not None and refilled >= 1
    # debt is bounded by the capacity
    assert await lim.debit("erin", 10**9) == -6000
    # other principals have their own bucket; no limit configured -> no-op
    assert await lim.check_tokens("frank") == 6000
    unlimited = RateLimiter(r, LIMITS)
    assert await unlimited.check_tokens("erin") is None and await unlimited.debit("erin", 5) is None


async def test_token_burst(r: aioredis.Redis) -> None:
    lim = RateLimiter(r, LIMITS, tokens_per_minute=60, token_burst=10)
    assert await lim.check_tokens("gus") == 10
    await lim.debit("gus", 10)
    with pytest.raises(ResourceExhausted) as e:
        await lim.check_tokens("gus")
    assert 0.9 <= e.value.retry_after_s <= 1.0


async def test_bad_config_and_class(r: aioredis.Redis) -> None:
    lim = RateLimiter(r, {"read": Limit(0, 1.0)})
    with pytest.raises(ValueError):
        await lim.admit("p", "write")
    with pytest.raises(ResourceExhausted):
        await lim.admit("p", "read")
    with pytest.raises(ValueError):
        RateLimiter(r, {"read": Limit(1, 0)})
    with pytest.raises(ValueError):
        RateLimiter(r, {}, tokens_per_minute=0)


def test_default_fail_policy() -> None:
    assert {k for k, v in DEFAULT_FAIL_OPEN.items() if v} == {"read", "embed", "generate"}
    assert {k for k, v in DEFAULT_FAIL_OPEN.items() if not v} == {"write", "job", "admin"}


async def test_redis_down_then_back_on_same_port() -> None:
    srv = RedisServer()
    srv.start()
    client = aioredis.Redis(host="127.0.0.1", port=srv.port)  # default client settings
    try:
        lim = RateLimiter(client, LIMITS, tokens_per_minute=600, retry_interval_s=0.1)
        overridden = RateLimiter(client, LIMITS, fail_open={"read": False, "job": True}, retry_interval_s=0.1)
        await lim.admit("hank", "write")
        await lim.check_tokens("hank")

        srv.stop()
        t0 = time.monotonic()
        for klass in ("write", "job", "admin"):
            with pytest.raises(Unavailable) as e:
                await lim.admit("hank", klass)
            assert e.value.retry_after_s == 1
        for klass in ("read", "embed", "generate"):
            await lim.admit("hank", klass)  # fail open
        assert await lim.check_tokens("hank") is None  # follows "generate": open
        assert await lim.debit("hank", 50) is None  # dropped
        with pytest.raises(Unavailable):
            await overridden.admit("hank", "read")
        await overridden.admit("hank", "job")
        assert lim.backend_down
        assert time.monotonic() - t0 < 2.0  # no call hangs while Redis is down

        srv.start()  # same port, empty (no scripts cached, no keys)
        deadline = time.monotonic() + 5
        while True:
            try:
                await lim.admit("hank", "write")
                break
            except Unavailable:
                assert time.monotonic() < deadline, "limiter did not recover"
                await asyncio.sleep(0.05)
        assert not _down(lim)  # via a call: mypy still holds lim.backend_down narrowed to True
        results = [await outcome(lim, "hank", "write") for _ in range(6)]
        assert results == [True] * 4 + [False] * 2  # limits enforced again (1 + 4 == 5)
        await lim.debit("hank", 600)
        with pytest.raises(ResourceExhausted):
            await lim.check_tokens("hank")
    finally:
        await client.aclose()
        srv.stop()


async def test_unresponsive_redis_times_out() -> None:
    """A Redis that accepts connections but never answers costs at most timeout_s."""
    held: list[asyncio.StreamWriter] = []

    async def black_hole(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    hole = await asyncio.start_server(black_hole, "127.0.0.1", 0)
    port = hole.sockets[0].getsockname()[1]
    client = aioredis.Redis(host="127.0.0.1", port=port)
    try:
        lim = RateLimiter(client, LIMITS, timeout_s=0.2, retry_interval_s=0.3)
        t0 = time.monotonic()
        with pytest.raises(Unavailable):
            await lim.admit("ivy", "admin")
        assert time.monotonic() - t0 < 0.5
        t0 = time.monotonic()
        await lim.admit("ivy", "read")  # open, and Redis is skipped while marked down
        with pytest.raises(Unavailable):
            await lim.admit("ivy", "write")
        assert time.monotonic() - t0 < 0.05

        async def timed() -> float:
            t = time.monotonic()
            await lim.admit("ivy", "read")
            return time.monotonic() - t

        await asyncio.sleep(0.3)
        durations = await asyncio.gather(*(timed() for _ in range(20)))
        assert sum(d > 0.1 for d in durations) == 1  # exactly one call probes the dead Redis
    finally:
        for w in held:
            w.close()
        hole.close()
        await client.aclose()


async def test_nonce_rate_limit_and_tokens_in_one_round_trip(r: aioredis.Redis) -> None:
    lim = RateLimiter(r, LIMITS, tokens_per_minute=60)
    key = "llmesh:nonce:k1:abc"
    await lim.admit("nina", "generate", nonce_key=key, nonce_ttl_s=600, tokens=True)
    assert 590 <= await r.ttl(key) <= 600
    before = await r.zcard(lim.key("nina", "generate"))
    with pytest.raises(Unauthenticated, match="replayed"):
        await lim.admit("nina", "generate", nonce_key=key, nonce_ttl_s=600, tokens=True)
    assert await r.zcard(lim.key("nina", "generate")) == before  # a replay is not counted
    await lim.admit("nina", "generate", nonce_key="llmesh:nonce:k2:abc", nonce_ttl_s=600)  # per key id
    await lim.debit("nina", 100)  # budget empty: refused before the request is counted
    with pytest.raises(ResourceExhausted) as e:
        await lim.admit("nina", "generate", nonce_key="llmesh:nonce:k1:def", nonce_ttl_s=600, tokens=True)
    assert e.value.metadata["quota_class"] == "tokens"
    assert await r.zcard(lim.key("nina", "generate")) == before + 1


async def test_nonces_fall_back_to_replica_memory_while_redis_is_down() -> None:
    srv = RedisServer()
    srv.start()
    client = aioredis.Redis(host="127.0.0.1", port=srv.port)
    try:
        lim = RateLimiter(client, LIMITS, retry_interval_s=60)
        srv.stop()
        await lim.admit("olga", "read", nonce_key="llmesh:nonce:k:n1", nonce_ttl_s=600)  # fail open
        with pytest.raises(Unauthenticated, match="replayed"):
            await lim.admit("olga", "read", nonce_key="llmesh:nonce:k:n1", nonce_ttl_s=600)
        with pytest.raises(Unavailable):  # closed classes refuse whatever the nonce
            await lim.admit("olga", "write", nonce_key="llmesh:nonce:k:n2", nonce_ttl_s=600)
    finally:
        await client.aclose()
        srv.stop()
