"""Benchmark: multi-LoRA serving. Generation throughput with one adapter vs eight
distinct adapters mixed in the same load (goal: mixed >= 0.8x single), with the base
model as a reference, and the first-request latency of a never-loaded adapter.

Starts its own throwaway mesh (demo model) on free loopback ports and writes random
LoRA adapters (r=4 on q_proj/v_proj, ``make_random_adapter``) into its adapter folder:
bench-a0..bench-a7 for the load, bench-cold0.. for the cold-start sample. All calls go
straight to the inference service (grpc aio, streamed GenerateStream, operator identity).

Throughput: after a warm-up (one request on the base model and on each of the 8
adapters, so all 8 are resident: Triton's LRU holds adapter_cache_size = 8; then one
short unmeasured level per configuration), each round runs, per concurrency level, the
same requests (same prompts, seed = request index, --max-tokens tokens) three ways:
all on bench-a0 ("single"), round-robin over bench-a0..a7 ("mixed", every running batch
holds several adapters) and without adapter ("base"). The order of the three alternates
between rounds, so drift on this shared machine hits them alike.
tok/s = completion tokens (from usage) / wall time of the level; the reported value is
the median over rounds, TTFT p50 is over all requests of all rounds, rows/step is the
mean number of rows Triton decoded per step (its /metrics), and mixed/single is the
median of the per-round ratios (each round's pair ran back to back). tok/CPU-s divides
the tokens by the CPU time the model process (Triton's Python backend stub) used during
the level: other work on a shared machine steals wall time far more than it changes
this, so it is the steadier measure of what mixing adapters costs the model itself.

Cold adapter: for each fresh adapter, a request on an adapter that is loaded (bench-a0),
then the first request on the never-loaded one (Triton loads it from disk, evicting the
least recently used one), then a second request on it. The added load time is the
first request's TTFT minus the second's; the model's own log line "loaded adapter ... in
N ms" is read back from Triton's log as well. Writes bench/out/adapters.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import tempfile
import time
import urllib.request
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from llmesh.client import OPERATOR
from llmesh.client import sampling as sampling_pb
from llmesh.config import MeshConfig
from llmesh.pb.inference.v1 import inference_pb2 as pb
from llmesh.pb.inference.v1 import inference_pb2_grpc as pb_grpc
from llmesh.runtime.channels import channel_options
from llmesh.runtime.identity import IDENTITY_KEY, InternalIdentity, load_secret

OUT = Path(__file__).parent / "out"
PROMPTS = ["如何重置密码?", "How do I connect to the VPN?", "请假流程是什么?", "Where do I submit invoices?"]
MIXED = [f"bench-a{i}" for i in range(8)]
SINGLE = MIXED[:1]
CONFIGS: dict[str, list[str]] = {"base": [""], "single": SINGLE, "mixed": MIXED}
LOADED_RE = re.compile(r"loaded adapter '([^']+)' in ([0-9.]+) ms")
EVICTED_RE = re.compile(r"evicted adapter '([^']+)'")


@dataclass
class Sample:
    ttft_s: float
    total_s: float
    tokens: int


@dataclass
class Level:
    config: str
    concurrency: int
    round: int
    requests: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_ms: list[float] = field(repr=False)
    mean_batch: float
    model_cpu_s: float  # CPU time the model process (Triton's Python backend stub) used during the level


@dataclass
class Row:
    config: str
    concurrency: int
    rounds: int
    requests: int
    tokens_per_s: float  # median over rounds
    tokens_per_s_runs: list[float]
    ttft_p50_ms: float  # over all requests of all rounds
    ttft_p95_ms: float
    tokens_per_request: float
    mean_batch: float
    tokens_per_cpu_s: float  # tokens / CPU seconds of the model process, median over rounds


@dataclass
class Cold:
    adapter: str
    loaded_ttft_ms: float
    loaded_total_ms: float
    cold_ttft_ms: float
    cold_total_ms: float
    warm_ttft_ms: float
    warm_total_ms: float
    added_ms: float  # cold TTFT - warm TTFT
    server_load_ms: float | None  # Triton's own "loaded adapter ... in N ms"
    evicted: list[str]


class Client:
    def __init__(self, cfg: MeshConfig, max_tokens: int) -> None:
        self.channel = grpc.aio.insecure_channel(
            f"{cfg.inference.server.host}:{cfg.inference.server.port}", options=channel_options()
        )
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.identity = InternalIdentity(load_secret(cfg.home))
        self.max_tokens = max_tokens

    async def generate(self, i: int, adapter: str) -> Sample:
        """One streamed generation: prompt and seed fixed by ``i``."""
        req = pb.GenerateRequest(
            prompt=PROMPTS[i % len(PROMPTS)],
            adapter=adapter,
            sampling=sampling_pb(max_tokens=self.max_tokens, temperature=1.0, seed=i),
        )
        md = ((IDENTITY_KEY, self.identity.mint(OPERATOR)),)  # straight to the service, as the gateway would
        t0 = time.perf_counter()
        ttft, tokens = None, 0
        async for msg in self.stub.GenerateStream(req, timeout=300, metadata=md):
            if ttft is None:
                ttft = time.perf_counter() - t0
            if msg.finish_reason:
                tokens = msg.usage.completion_tokens
        return Sample(ttft or 0.0, time.perf_counter() - t0, tokens)

    async def close(self) -> None:
        await self.channel.close()


def triton_counters(metrics_url: str) -> tuple[float, float]:
    """(active rows summed over decode steps, decode steps) from the llm model's metrics."""
    body = urllib.request.urlopen(metrics_url, timeout=5).read().decode()

    def total(prefix: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(prefix))

    return total("llmesh_llm_active_rows_total"), total("llmesh_llm_decode_steps_total")


class ModelProcess:
    """CPU time of this mesh's Triton Python backend stub (the process running model.py).
    Other processes on a shared machine steal wall time, much less this process's CPU
    time, so tokens per CPU second is the steadier efficiency figure."""

    def __init__(self, home: Path) -> None:
        self.pid = None
        for proc in Path("/proc").iterdir():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (
                cmd
                and cmd[0].endswith(b"triton_python_backend_stub")
                and str(home).encode() in cmd[0]
                and b"/llm/" in b" ".join(cmd)
            ):
                self.pid = int(proc.name)
        self.tick = os.sysconf("SC_CLK_TCK")

    def cpu_s(self) -> float:
        if self.pid is None:
            return float("nan")
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime


class TritonLog:
    """Reads what Triton's log gained since the last call (adapter loads and evictions)."""

    def __init__(self, path: Path) -> None:
        self.path, self.pos = path, path.stat().st_size if path.exists() else 0

    def new(self) -> str:
        if not self.path.exists():
            return ""
        with open(self.path, encoding="utf-8", errors="replace") as f:
            f.seek(self.pos)
            text = f.read()
            self.pos = f.tell()
        return text


async def run_level(
    client: Client,
    config: str,
    adapters: list[str],
    concurrency: int,
    n: int,
    rnd: int,
    metrics_url: str,
    model: ModelProcess,
) -> Level:
    queue = deque(range(n))  # request i uses adapters[i % len]: round-robin in arrival order
    samples: list[Sample] = []

    async def worker() -> None:
        while queue:
            i = queue.popleft()
            samples.append(await client.generate(i, adapters[i % len(adapters)]))

    r0, b0 = triton_counters(metrics_url)
    c0, t0 = model.cpu_s(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall, c1 = time.perf_counter() - t0, model.cpu_s()
    r1, b1 = triton_counters(metrics_url)
    tokens = sum(s.tokens for s in samples)
    return Level(
        config,
        concurrency,
        rnd,
        n,
        tokens,
        wall,
        tokens / wall,
        [s.ttft_s * 1000 for s in samples],
        (r1 - r0) / max(1.0, b1 - b0),
        c1 - c0,
    )


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def throughput(
    client: Client, levels: list[int], rounds: int, requests: int, metrics_url: str, log: TritonLog, model: ModelProcess
) -> tuple[list[Level], dict[str, int]]:
    # warm-up: the base model, then one request per adapter (the first one wraps the base
    # model in PEFT), then one level of each configuration so every path is hot
    await client.generate(0, "")
    for i, name in enumerate(MIXED):
        await client.generate(i, name)
    for c in levels:
        for name, adapters in CONFIGS.items():
            await run_level(client, name, adapters, c, c, -1, metrics_url, model)
    log.new()
    order = list(CONFIGS)
    out: list[Level] = []
    start = time.perf_counter()
    for rnd in range(rounds):
        for c in levels:
            for name in order if rnd % 2 == 0 else order[::-1]:
                lv = await run_level(client, name, CONFIGS[name], c, max(requests, 2 * c), rnd, metrics_url, model)
                out.append(lv)
                print(
                    f"  {time.perf_counter() - start:5.1f}s round {rnd} conc {c:>2} {name:<6} {lv.tokens_per_s:7.1f} "
                    f"tok/s, {lv.tokens / lv.model_cpu_s:6.0f} tok/CPU-s (ttft p50 "
                    f"{statistics.median(lv.ttft_ms):6.1f} ms, rows/step {lv.mean_batch:4.1f})",
                    flush=True,
                )
    await asyncio.sleep(0.5)
    text = log.new()  # the 8 adapters fit the cache: nothing should have been (re)loaded or evicted
    return out, {"loads": len(LOADED_RE.findall(text)), "evictions": len(EVICTED_RE.findall(text))}


async def cold_starts(client: Client, names: list[str], log: TritonLog) -> list[Cold]:
    out = []
    for k, name in enumerate(names):
        i = 1000 + k  # a prompt/seed not used for anything else, the same for the three calls
        await asyncio.sleep(0.2)
        loaded = await client.generate(i, SINGLE[0])
        log.new()
        cold = await client.generate(i, name)
        warm = await client.generate(i, name)
        await asyncio.sleep(0.5)  # let the log line reach the file
        text = log.new()
        loads = {m.group(1): float(m.group(2)) for m in LOADED_RE.finditer(text)}
        out.append(
            Cold(
                name,
                loaded.ttft_s * 1000,
                loaded.total_s * 1000,
                cold.ttft_s * 1000,
                cold.total_s * 1000,
                warm.ttft_s * 1000,
                warm.total_s * 1000,
                (cold.ttft_s - warm.ttft_s) * 1000,
                loads.get(name),
                EVICTED_RE.findall(text),
            )
        )
    return out


def summarize(levels: list[Level], concurrencies: list[int]) -> tuple[list[Row], dict[str, float]]:
    rows = []
    for c in concurrencies:
        for name in CONFIGS:
            lv = [x for x in levels if x.config == name and x.concurrency == c]
            ttfts = [t for x in lv for t in x.ttft_ms]
            rows.append(
                Row(
                    name,
                    c,
                    len(lv),
                    sum(x.requests for x in lv),
                    statistics.median(x.tokens_per_s for x in lv),
                    [round(x.tokens_per_s, 1) for x in lv],
                    statistics.median(ttfts),
                    pct(ttfts, 0.95),
                    sum(x.tokens for x in lv) / sum(x.requests for x in lv),
                    statistics.mean(x.mean_batch for x in lv),
                    statistics.median(x.tokens / x.model_cpu_s for x in lv),
                )
            )
    ratios: dict[str, float] = {}
    for c in concurrencies:

        def per_round(a: str, b: str, cpu: bool = False, c: int = c) -> list[float]:
            by = {
                (x.config, x.round): x.tokens / x.model_cpu_s if cpu else x.tokens_per_s
                for x in levels
                if x.concurrency == c
            }
            return [by[(a, r)] / by[(b, r)] for r in sorted({x.round for x in levels})]

        ms, bs = per_round("mixed", "single"), per_round("single", "base")
        ratios[f"mixed_over_single_c{c}"] = statistics.median(ms)
        ratios[f"mixed_over_single_c{c}_min"] = min(ms)
        ratios[f"mixed_over_single_c{c}_max"] = max(ms)
        ratios[f"single_over_base_c{c}"] = statistics.median(bs)
        ratios[f"mixed_over_single_cpu_c{c}"] = statistics.median(per_round("mixed", "single", cpu=True))
        ratios[f"single_over_base_cpu_c{c}"] = statistics.median(per_round("single", "base", cpu=True))
    return rows, ratios


def report(
    rows: list[Row],
    ratios: dict[str, float],
    colds: list[Cold],
    concurrencies: list[int],
    swaps: dict[str, int],
    first_load_ms: float | None,
) -> None:
    print(
        f"\n{'config':<7} {'conc':>4} {'reqs':>5} {'tok/s':>8} {'tok/CPU-s':>10} {'ttft p50 ms':>12} "
        f"{'ttft p95 ms':>12} {'tok/req':>8} {'rows/step':>9}"
    )
    for r in rows:
        print(
            f"{r.config:<7} {r.concurrency:>4} {r.requests:>5} {r.tokens_per_s:>8.1f} {r.tokens_per_cpu_s:>10.0f} "
            f"{r.ttft_p50_ms:>12.1f} {r.ttft_p95_ms:>12.1f} {r.tokens_per_request:>8.1f} {r.mean_batch:>9.1f}"
        )
    print()
    for c in concurrencies:
        m = ratios[f"mixed_over_single_c{c}"]
        print(
            f"concurrency {c:>2}: mixed/single tok/s = {m:.2f}x (rounds {ratios[f'mixed_over_single_c{c}_min']:.2f}"
            f"..{ratios[f'mixed_over_single_c{c}_max']:.2f}; goal >= 0.80: {'met' if m >= 0.8 else 'NOT met'}), "
            f"single/base = {ratios[f'single_over_base_c{c}']:.2f}x; per model CPU second: mixed/single = "
            f"{ratios[f'mixed_over_single_cpu_c{c}']:.2f}x, single/base = {ratios[f'single_over_base_cpu_c{c}']:.2f}x"
        )
    print(f"adapter loads / evictions during the measured rounds: {swaps['loads']} / {swaps['evictions']}")
    if first_load_ms is not None:
        print(f"first adapter ever (wraps the base model in PEFT): loaded in {first_load_ms:.1f} ms (Triton log)")
    print(
        f"\n{'cold adapter':<12} {'loaded ttft':>11} {'cold ttft':>10} {'cold total':>10} {'warm ttft':>10} "
        f"{'warm total':>10} {'added ms':>9} {'load ms (log)':>13}  evicted"
    )
    for x in colds:
        srv = f"{x.server_load_ms:.1f}" if x.server_load_ms is not None else "-"
        print(
            f"{x.adapter:<12} {x.loaded_ttft_ms:>11.1f} {x.cold_ttft_ms:>10.1f} {x.cold_total_ms:>10.1f} "
            f"{x.warm_ttft_ms:>10.1f} {x.warm_total_ms:>10.1f} {x.added_ms:>9.1f} {srv:>13}  {','.join(x.evicted) or '-'}"
        )
    if colds:
        print(f"median added first-request latency: {statistics.median(x.added_ms for x in colds):.1f} ms")


def plot(rows: list[Row], concurrencies: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(CONFIGS)
    labels = {"base": "base (no adapter)", "single": "1 adapter", "mixed": "8 adapters mixed"}
    for ax, attr, title in (
        (axes[0], "tokens_per_s", "tokens/s (wall)"),
        (axes[1], "tokens_per_cpu_s", "tokens per CPU second of the model process"),
    ):
        for k, name in enumerate(CONFIGS):
            ys = [
                next(getattr(r, attr) for r in rows if r.config == name and r.concurrency == c) for c in concurrencies
            ]
            xs = [j + (k - (len(CONFIGS) - 1) / 2) * width for j in range(len(concurrencies))]
            ax.bar_label(ax.bar(xs, ys, width, label=labels[name]), fmt="%.0f", fontsize=8)
        ax.set_xticks(range(len(concurrencies)), [f"concurrency {c}" for c in concurrencies])
        ax.set_title(f"{title}, median over rounds", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("Multi-LoRA serving: 1 adapter vs 8 adapters mixed in the same load")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


async def bench(
    cfg: MeshConfig, args: argparse.Namespace, concurrencies: list[int], cold_names: list[str]
) -> tuple[list[Level], dict[str, int], list[Cold], float | None]:
    client = Client(cfg, args.max_tokens)
    metrics_url = f"http://127.0.0.1:{cfg.triton.metrics_port}/metrics"
    log = TritonLog(cfg.log_dir / "tritonserver.log")  # read from its current end
    model = ModelProcess(cfg.home)
    levels, swaps = await throughput(client, concurrencies, args.rounds, args.requests, metrics_url, log, model)
    colds = await cold_starts(client, cold_names, log)
    await client.close()
    # the first load (PeftModel.from_pretrained around the base model) happened in the warm-up
    full = (cfg.log_dir / "tritonserver.log").read_text(encoding="utf-8", errors="replace")
    first = next((float(m.group(2)) for m in LOADED_RE.finditer(full) if m.group(1) == MIXED[0]), None)
    return levels, swaps, colds, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="rounds of base/single/mixed per concurrency level, order alternating (default 5)",
    )
    ap.add_argument(
        "--requests",
        type=int,
        default=64,
        help="streamed generations per configuration, level and "
        "round, raised to 2x the concurrency when lower (default 64)",
    )
    ap.add_argument("--concurrency", default="8,16", help="concurrency levels, comma-separated (default 8,16)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default 32)")
    ap.add_argument(
        "--cold", type=int, default=3, help="fresh never-loaded adapters for the cold-start sample (default 3)"
    )
    args = ap.parse_args()
    concurrencies = [int(x) for x in args.concurrency.split(",")]
    cold_names = [f"bench-cold{i}" for i in range(args.cold)]
    OUT.mkdir(exist_ok=True)

    from tests.support.sandbox import ephemeral_mesh, make_random_adapter

    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="llmesh-bench-") as tmp, ephemeral_mesh(Path(tmp)) as (cfg, _):
        print(
            f"mesh up in {time.perf_counter() - t0:.0f} s; writing {len(MIXED) + len(cold_names)} random adapters",
            flush=True,
        )
        # adapters are loaded lazily by folder name, so they can be written after the start
        for seed, name in enumerate(MIXED + cold_names, start=100):
            make_random_adapter(cfg.llm_path, cfg.adapter_dir / name, seed=seed)
        levels, swaps, colds, first = asyncio.run(bench(cfg, args, concurrencies, cold_names))
    rows, ratios = summarize(levels, concurrencies)
    report(rows, ratios, colds, concurrencies, swaps, first)
    plot(rows, concurrencies, OUT / "adapters.png")
    load1 = os.getloadavg()[0]
    print(f"1-min load average {load0:.2f} at the start, {load1:.2f} at the end (2 means both cores busy)")
    (OUT / "adapters.json").write_text(
        json.dumps(
            {
                "load_average_1min": [load0, load1],
                "settings": {
                    "rounds": args.rounds,
                    "requests": args.requests,
                    "concurrency": concurrencies,
                    "max_tokens": args.max_tokens,
                    "adapters": MIXED,
                    "cold": cold_names,
                },
                "rows": [asdict(r) for r in rows],
                "ratios": ratios,
                "adapter_swaps_during_rounds": swaps,
                "first_adapter_load_ms": first,
                "cold": [asdict(c) for c in colds],
                "levels": [{k: v for k, v in asdict(x).items() if k != "ttft_ms"} for x in levels],
            },
            indent=2,
        )
    )
    print(f"\nwrote {OUT / 'adapters.png'} and {OUT / 'adapters.json'} ({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
