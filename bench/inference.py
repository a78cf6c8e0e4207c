"""Benchmark: time to first token (TTFT) and tokens/s, Triton called directly vs
through the inference service, at several concurrencies, in one run.

Reports ratios against the in-run baseline (direct Triton), not absolute claims:
  overhead  = service TTFT p50 / direct TTFT p50, and direct tok/s / service tok/s
  batching  = tok/s at the highest concurrency / tok/s at concurrency 1 (per path)
  batch     = mean rows per decode step during the level (Triton /metrics)

By default it starts its own throwaway mesh on free loopback ports (demo models),
so it never disturbs a running one; --config points it at an existing mesh.
Writes bench/out/inference.png and bench/out/inference.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import tritonclient.grpc.aio as triton
from tritonclient.grpc import InferRequestedOutput

from llmesh.client import OPERATOR
from llmesh.client import sampling as sampling_pb
from llmesh.config import MeshConfig, load_config
from llmesh.pb.inference.v1 import inference_pb2 as pb
from llmesh.pb.inference.v1 import inference_pb2_grpc as pb_grpc
from llmesh.runtime.identity import IDENTITY_KEY, InternalIdentity, load_secret
from llmesh.services.inference.llm_backend import OUTPUTS, GenerationInput, build_inputs
from llmesh.services.inference.sampling import Sampling

OUT = Path(__file__).parent / "out"
PROMPTS = ["如何重置密码?", "How do I connect to the VPN?", "请假流程是什么?", "Where do I submit invoices?"]


@dataclass
class Sample:
    ttft_s: float
    total_s: float
    tokens: int


@dataclass
class Row:
    path: str
    concurrency: int
    requests: int
    ttft_p50_ms: float
    ttft_p95_ms: float
    tokens_per_s: float
    wall_s: float
    mean_batch: float  # rows per decode step during this level (from Triton's /metrics)


# One streamed generation: returns (ttft, total, completion tokens).
Call = Callable[[int], Awaitable[Sample]]


def direct_call(client: triton.InferenceServerClient, model: str, max_tokens: int) -> Call:
    async def call(i: int) -> Sample:
        inp = GenerationInput(
            Sampling(temperature=1.0, max_tokens=max_tokens, seed=i), prompt=PROMPTS[i % len(PROMPTS)]
        )

        async def reqs() -> AsyncIterator[dict[str, Any]]:
            yield {
                "model_name": model,
                "inputs": build_inputs(inp, True),
                "outputs": [InferRequestedOutput(n) for n in OUTPUTS],
            }

        t0 = time.perf_counter()
        ttft, tokens = None, 0
        async for result, error in client.stream_infer(reqs()):
            if error is not None:
                raise error
            if ttft is None:
                ttft = time.perf_counter() - t0
            if result.as_numpy("finish_reason").reshape(-1)[0]:
                tokens = int(result.as_numpy("completion_tokens").reshape(-1)[0])
                break
        return Sample(ttft or 0.0, time.perf_counter() - t0, tokens)

    return call


def service_call(stub: pb_grpc.InferenceAsyncStub, max_tokens: int, identity: InternalIdentity) -> Call:
    async def call(i: int) -> Sample:
        req = pb.GenerateRequest(
            prompt=PROMPTS[i % len(PROMPTS)], sampling=sampling_pb(max_tokens=max_tokens, temperature=1.0, seed=i)
        )
        t0 = time.perf_counter()
        ttft, tokens = None, 0
        md = ((IDENTITY_KEY, identity.mint(OPERATOR)),)  # straight to the service, as the gateway would
        async for msg in stub.GenerateStream(req, timeout=300, metadata=md):
            if ttft is None:
                ttft = time.perf_counter() - t0
            if msg.finish_reason:
                tokens = msg.usage.completion_tokens
        return Sample(ttft or 0.0, time.perf_counter() - t0, tokens)

    return call


def triton_counters(metrics_url: str) -> tuple[float, float]:
    """(active rows summed over decode steps, decode steps) from the llm model's custom
    metrics: their deltas' ratio is the mean number of rows decoded together per step."""
    body = urllib.request.urlopen(metrics_url, timeout=5).read().decode()

    def total(prefix: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(prefix))

    return total("llmesh_llm_active_rows_total"), total("llmesh_llm_decode_steps_total")


async def run_level(path: str, call: Call, concurrency: int, n: int, metrics_url: str) -> Row:
    queue = list(range(n))
    samples: list[Sample] = []

    async def worker() -> None:
        while queue:
            samples.append(await call(queue.pop()))

    r0, b0 = triton_counters(metrics_url)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    r1, b1 = triton_counters(metrics_url)
    ttfts = sorted(s.ttft_s * 1000 for s in samples)
    return Row(
        path,
        concurrency,
        n,
        statistics.median(ttfts),
        ttfts[max(0, int(0.95 * len(ttfts)) - 1)],
        sum(s.tokens for s in samples) / wall,
        wall,
        (r1 - r0) / max(1.0, b1 - b0),
    )


async def bench(cfg: MeshConfig, levels: list[int], requests: int, max_tokens: int) -> list[Row]:
    client = triton.InferenceServerClient(cfg.inference.peers.triton)
    channel = grpc.aio.insecure_channel(f"{cfg.inference.server.host}:{cfg.inference.server.port}")
    stub = pb_grpc.InferenceStub(channel)
    calls = {
        "direct": direct_call(client, cfg.inference.model, max_tokens),
        "service": service_call(stub, max_tokens, InternalIdentity(load_secret(cfg.home))),
    }
    metrics_url = f"http://127.0.0.1:{cfg.triton.metrics_port}/metrics"
    rows = []
    for c in levels:
        for name, call in calls.items():  # interleaved so drift on a shared machine hits both paths alike
            await run_level(name, call, c, c, metrics_url)  # warm-up at this level
            rows.append(await run_level(name, call, c, max(requests, 2 * c), metrics_url))
    await channel.close()
    await client.close()
    return rows


def report(rows: list[Row], levels: list[int]) -> dict[str, float]:
    by = {(r.path, r.concurrency): r for r in rows}
    print(f"{'path':<8} {'conc':>4} {'reqs':>5} {'ttft p50 ms':>12} {'ttft p95 ms':>12} {'tok/s':>9} {'batch':>6}")
    for r in rows:
        print(
            f"{r.path:<8} {r.concurrency:>4} {r.requests:>5} {r.ttft_p50_ms:>12.1f} {r.ttft_p95_ms:>12.1f} "
            f"{r.tokens_per_s:>9.1f} {r.mean_batch:>6.1f}"
        )
    ratios: dict[str, float] = {}
    print()
    for c in levels:
        d, s = by[("direct", c)], by[("service", c)]
        ratios[f"ttft_overhead_c{c}"] = s.ttft_p50_ms / d.ttft_p50_ms
        ratios[f"throughput_ratio_c{c}"] = s.tokens_per_s / d.tokens_per_s
        print(
            f"concurrency {c:>2}: service/direct TTFT p50 = {ratios[f'ttft_overhead_c{c}']:.2f}x, "
            f"service/direct tok/s = {ratios[f'throughput_ratio_c{c}']:.2f}x"
        )
    hi = max(levels)
    for p in ("direct", "service"):
        ratios[f"batching_gain_{p}"] = by[(p, hi)].tokens_per_s / by[(p, min(levels))].tokens_per_s
        print(f"batching gain ({p}): tok/s at {hi} / tok/s at {min(levels)} = {ratios[f'batching_gain_{p}']:.2f}x")
    return ratios


def plot(rows: list[Row], levels: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for p, style in (("direct", "o-"), ("service", "s--")):
        pr = [r for r in rows if r.path == p]
        a.plot([r.concurrency for r in pr], [r.ttft_p50_ms for r in pr], style, label=p)
        b.plot([r.concurrency for r in pr], [r.tokens_per_s for r in pr], style, label=p)
    for ax, title in ((a, "TTFT p50 (ms)"), (b, "tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(x) for x in levels])
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, help="use the running mesh of this config instead of a throwaway one")
    ap.add_argument("--levels", default="1,4,16", help="concurrency levels (default 1,4,16)")
    ap.add_argument("--requests", type=int, default=48, help="requests per path and level (default 48)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default 32)")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    OUT.mkdir(exist_ok=True)
    if args.config:
        rows = asyncio.run(bench(load_config(args.config), levels, args.requests, args.max_tokens))
    else:
        from tests.support.sandbox import ephemeral_mesh

        with tempfile.TemporaryDirectory(prefix="llmesh-bench-") as tmp, ephemeral_mesh(Path(tmp)) as (cfg, _):
            rows = asyncio.run(bench(cfg, levels, args.requests, args.max_tokens))
    ratios = report(rows, levels)
    plot(rows, levels, OUT / "inference.png")
    (OUT / "inference.json").write_text(json.dumps({"rows": [asdict(r) for r in rows], "ratios": ratios}, indent=2))
    print(f"\nwrote {OUT / 'inference.png'} and {OUT / 'inference.json'}")


if __name__ == "__main__":
    main()
