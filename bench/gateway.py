"""Benchmark: what the gateway adds. A small unary call (ListTemplates) and a streamed
generation, straight to the inference service vs through the gateway with JWT +
HMAC signature + nonce check + rate limit + masking + audit on, in one run.

Two gateways serve the same mesh: the mesh's own (audit records fsynced in the spool
before each response, the default) and a second one with ``audit_fsync: false`` (records
written to the spool, not fsynced): their difference is what the durable audit costs.
Paths are measured in interleaved rounds so that drift of the machine hits all alike.

Reports p50/p99 latency, calls/s at a fixed concurrency, the added milliseconds at p50
(the goal: under 1 ms for unary calls) and the fsync's cost at p50/p99 (goal: 0.2 ms at
p50). Starts its own throwaway mesh on free loopback ports with rate limits high enough
not to refuse the benchmark's calls. Writes bench/out/gateway.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from llmesh.auth.signature import sign
from llmesh.client import OPERATOR, sampling
from llmesh.config import MeshConfig
from llmesh.pb.inference.v1 import inference_pb2 as pb
from llmesh.pb.inference.v1 import inference_pb2_grpc as pb_grpc
from llmesh.pb.security.v1 import security_pb2 as spb
from llmesh.pb.security.v1 import security_pb2_grpc as spb_grpc
from llmesh.runtime.identity import IDENTITY_KEY, InternalIdentity, load_secret

OUT = Path(__file__).parent / "out"
LIST = "/llmesh.inference.v1.Inference/ListTemplates"
STREAM = "/llmesh.inference.v1.Inference/GenerateStream"
HIGH = {k: {"requests": 10_000_000, "window_s": 60} for k in ("read", "write", "generate", "embed", "job", "admin")}
PATHS = ("direct", "gateway", "gateway_nofsync")
ROUNDS = 5


class Credentials:
    def __init__(self, key_id: str, secret: str, token: str) -> None:
        self.key_id, self.secret, self.token = key_id, secret.encode(), token

    def metadata(self, method: str, request: object) -> list[tuple[str, str]]:
        body = request.SerializeToString()  # type: ignore[attr-defined]
        return [("authorization", f"Bearer {self.token}"), *sign(self.secret, method, body, key_id=self.key_id)]


async def credentials(cfg: MeshConfig, identity: InternalIdentity) -> Credentials:
    md = ((IDENTITY_KEY, identity.mint(OPERATOR)),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{cfg.security.server.port}") as ch:
        sec = spb_grpc.SecurityStub(ch)
        key = await sec.CreateApiKey(
            spb.CreateApiKeyRequest(owner="bench", tenant="bench", scopes=["inference:*"]), timeout=10, metadata=md
        )
        tok = await sec.IssueToken(
            spb.IssueTokenRequest(key_id=key.key.key_id, secret=key.secret), timeout=10, metadata=md
        )
    return Credentials(key.key.key_id, key.secret, tok.token)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def latencies(call: Callable[[], Awaitable[None]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def throughput(call: Callable[[], Awaitable[None]], n: int, concurrency: int) -> float:
    left = [n]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            await call()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - t0)


async def run(
    cfg: MeshConfig, nofsync: str, n_unary: int, n_stream: int, concurrency: int
) -> dict[str, dict[str, float]]:
    identity = InternalIdentity(load_secret(cfg.home))
    creds = await credentials(cfg, identity)
    channels = {
        "direct": grpc.aio.insecure_channel(f"127.0.0.1:{cfg.inference.server.port}"),
        "gateway": grpc.aio.insecure_channel(f"127.0.0.1:{cfg.gateway.server.port}"),
        "gateway_nofsync": grpc.aio.insecure_channel(nofsync),
    }
    stubs = {k: pb_grpc.InferenceStub(ch) for k, ch in channels.items()}
    list_req = pb.ListTemplatesRequest()
    gen_req = pb.GenerateRequest(prompt="请联系13812348000重置密码", sampling=sampling(max_tokens=32, seed=1))

    def unary(path: str) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            md = creds.metadata(LIST, list_req) if path != "direct" else ((IDENTITY_KEY, identity.mint(OPERATOR)),)
            await stubs[path].ListTemplates(list_req, metadata=md, timeout=10)

        return call

    def stream(path: str, ttft: list[float]) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            md = creds.metadata(STREAM, gen_req) if path != "direct" else ((IDENTITY_KEY, identity.mint(OPERATOR)),)
            t0 = time.perf_counter()
            first = True
            async for _ in stubs[path].GenerateStream(gen_req, metadata=md, timeout=60):
                if first:
                    ttft.append((time.perf_counter() - t0) * 1000)
                    first = False

        return call

    for path in PATHS:
        await latencies(unary(path), 50)  # warm-up
    lat: dict[str, list[float]] = {p: [] for p in PATHS}
    ttft: dict[str, list[float]] = {p: [] for p in PATHS}
    total: dict[str, list[float]] = {p: [] for p in PATHS}
    rate: dict[str, list[float]] = {p: [] for p in PATHS}
    for _ in range(ROUNDS):  # interleaved rounds
        for path in PATHS:
            lat[path] += await latencies(unary(path), n_unary // ROUNDS)
            total[path] += await latencies(stream(path, ttft[path]), max(1, n_stream // ROUNDS))
            rate[path].append(await throughput(unary(path), n_unary // ROUNDS, concurrency))
    results = {
        path: {
            "unary_p50_ms": statistics.median(lat[path]),
            "unary_p99_ms": pct(lat[path], 0.99),
            "unary_calls_per_s": statistics.median(rate[path]),
            "stream_ttft_p50_ms": statistics.median(ttft[path]),
            "stream_total_p50_ms": statistics.median(total[path]),
            "stream_total_p99_ms": pct(total[path], 0.99),
        }
        for path in PATHS
    }
    for ch in channels.values():
        await ch.close()
    return results


def report(r: dict[str, dict[str, float]], concurrency: int) -> None:
    d, g, n = r["direct"], r["gateway"], r["gateway_nofsync"]
    rows = [
        ("unary p50 ms", "unary_p50_ms"),
        ("unary p99 ms", "unary_p99_ms"),
        (f"unary calls/s (c={concurrency})", "unary_calls_per_s"),
        ("stream TTFT p50 ms", "stream_ttft_p50_ms"),
        ("stream total p50 ms", "stream_total_p50_ms"),
        ("stream total p99 ms", "stream_total_p99_ms"),
    ]
    print(f"{'metric':<26} {'direct':>10} {'gateway':>10} {'ratio':>7} {'no fsync':>10}")
    for label, k in rows:
        print(f"{label:<26} {d[k]:>10.2f} {g[k]:>10.2f} {g[k] / d[k]:>7.2f} {n[k]:>10.2f}")
    print(
        f"\nadded at p50: unary {g['unary_p50_ms'] - d['unary_p50_ms']:.2f} ms, "
        f"stream TTFT {g['stream_ttft_p50_ms'] - d['stream_ttft_p50_ms']:.2f} ms"
    )
    print(
        f"audit fsync adds: unary p50 {g['unary_p50_ms'] - n['unary_p50_ms']:.3f} ms, "
        f"p99 {g['unary_p99_ms'] - n['unary_p99_ms']:.3f} ms; "
        f"stream total p50 {g['stream_total_p50_ms'] - n['stream_total_p50_ms']:.3f} ms"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unary", type=int, default=1000, help="unary calls per path (default 1000)")
    ap.add_argument("--streams", type=int, default=40, help="streamed generations per path (default 40)")
    ap.add_argument("--concurrency", type=int, default=8, help="concurrency of the throughput run (default 8)")
    args = ap.parse_args()
    from tests.support.gateways import replica
    from tests.support.sandbox import ephemeral_mesh

    OUT.mkdir(exist_ok=True)
    limits = {"rate_limits": HIGH, "tokens_per_minute": 100_000_000}
    with (
        tempfile.TemporaryDirectory(prefix="llmesh-bench-") as tmp,
        ephemeral_mesh(Path(tmp), {"gateway": limits}) as (cfg, path),
    ):
        nofsync = replica(path, Path(tmp), "gateway-nofsync", {**limits, "audit_fsync": False})
        nofsync.start()
        try:
            results = asyncio.run(run(cfg, nofsync.address, args.unary, args.streams, args.concurrency))
        finally:
            nofsync.stop()
    report(results, args.concurrency)
    (OUT / "gateway.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {OUT / 'gateway.json'}")


if __name__ == "__main__":
    main()
