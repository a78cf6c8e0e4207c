"""Benchmark: time to first token (TTFT) and tokens/s, Triton called directly vs
through the inference service, at several concurrencies, in one run.

Reports ratios against the in-run baseline (direct Triton), not absolute claims:
  overhead  = service TTFT p50 / direct TTFT p50, and direct tok/s / service tok/s
  batching  = tok/s at the highest concurrency / tok/s at concurrency 1 (per path)
  batch     = mean rows per decode step during the level (Triton /metrics)

By default it starts its own throwaway mesh on free loopback ports serving the tiny test LM
(--model real: the real one, SmolLM2-135M-Instruct), so it never disturbs a running one;
--config points it at an existing mesh.

--baseline REF also serves REF's triton_models/llm (exported with git archive) as the model
llm_base in the same tritonserver, and --variant NAME:key=value,... serves copies of today's
model with other config parameters (e.g. fp32:quantization=none); each is called directly,
interleaved with the others at every level, and compared with the current model:
  vs_base = tok/s of the current model / tok/s of the baseline (TTFT: baseline / current)
Writes bench/out/inference.png and bench/out/inference.json.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.resources
import itertools
import json
import re
import shutil
import statistics
import subprocess
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
from llmesh.demo.catalog import DEFAULT_LM
from llmesh.pb.inference.v1 import inference_pb2 as pb
from llmesh.pb.inference.v1 import inference_pb2_grpc as pb_grpc
from llmesh.runtime.identity import IDENTITY_KEY, InternalIdentity, load_secret
from llmesh.services.inference.llm_backend import OUTPUTS, GenerationInput, build_inputs
from llmesh.services.inference.sampling import Sampling

OUT = Path(__file__).parent / "out"
ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["如何重置密码?", "How do I connect to the VPN?", "请假流程是什么?", "Where do I submit invoices?"]


def prompt_of(i: int) -> str:
    """Request i's prompt: distinct from every other request's from its first word, as real
    traffic is (the prefix cache may only reuse what they truly share: the chat template's turn)."""
    return f"Ticket {1000 + i}: {PROMPTS[i % len(PROMPTS)]}"


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
        inp = GenerationInput(Sampling(temperature=1.0, max_tokens=max_tokens, seed=i), prompt=prompt_of(i))

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
            prompt=prompt_of(i), sampling=sampling_pb(max_tokens=max_tokens, temperature=1.0, seed=i)
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


def triton_counters(metrics_url: str, model: str) -> tuple[float, float]:
    """(active rows summed over decode steps, decode steps) from one llm model's custom
    metrics: their deltas' ratio is the mean number of rows decoded together per step."""
    body = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    label = f'model="{model}"'

    def total(prefix: str) -> float:
        return sum(
            float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(prefix) and label in line
        )

    return total("llmesh_llm_active_rows_total"), total("llmesh_llm_decode_steps_total")


_REQUEST_IDS = itertools.count()  # run-wide: no two requests share a prompt (paths share a model)


async def run_level(path: str, call: Call, concurrency: int, n: int, metrics_url: str, model: str) -> Row:
    queue = [next(_REQUEST_IDS) for _ in range(n)]
    samples: list[Sample] = []

    async def worker() -> None:
        while queue:
            samples.append(await call(queue.pop()))

    r0, b0 = triton_counters(metrics_url, model)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    r1, b1 = triton_counters(metrics_url, model)
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


async def bench(
    cfg: MeshConfig, levels: list[int], requests: int, max_tokens: int, extra: list[str] | None = None
) -> list[Row]:
    """Every path at every level; `extra` are further Triton models called directly (path = model)."""
    client = triton.InferenceServerClient(cfg.inference.peers.triton)
    channel = grpc.aio.insecure_channel(f"{cfg.inference.server.host}:{cfg.inference.server.port}")
    stub = pb_grpc.InferenceStub(channel)
    model = cfg.inference.model
    calls: dict[str, tuple[Call, str]] = {
        "direct": (direct_call(client, model, max_tokens), model),
        "service": (service_call(stub, max_tokens, InternalIdentity(load_secret(cfg.home))), model),
    }
    for name in extra or []:
        calls[name] = (direct_call(client, name, max_tokens), name)
    metrics_url = f"http://127.0.0.1:{cfg.triton.metrics_port}/metrics"
    rows = []
    for c in levels:
        for name, (call, served) in calls.items():  # interleaved: drift on a shared machine hits all alike
            await run_level(name, call, c, c, metrics_url, served)  # warm-up at this level
            rows.append(await run_level(name, call, c, max(requests, 2 * c), metrics_url, served))
    await channel.close()
    await client.close()
    return rows


def report(rows: list[Row], levels: list[int], extra: list[str]) -> dict[str, float]:
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
    for p in extra:
        ratios[f"batching_gain_{p}"] = by[(p, hi)].tokens_per_s / by[(p, min(levels))].tokens_per_s
        print(f"batching gain ({p}): {ratios[f'batching_gain_{p}']:.2f}x")
        for c in levels:
            d, o = by[("direct", c)], by[(p, c)]
            ratios[f"tok_s_vs_{p}_c{c}"] = d.tokens_per_s / o.tokens_per_s
            ratios[f"ttft_vs_{p}_c{c}"] = d.ttft_p50_ms / o.ttft_p50_ms
            print(
                f"  concurrency {c:>2}: current/{p} tok/s = {ratios[f'tok_s_vs_{p}_c{c}']:.2f}x, "
                f"TTFT p50 = {ratios[f'ttft_vs_{p}_c{c}']:.2f}x"
            )
    return ratios


def plot(rows: list[Row], levels: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    paths = list(dict.fromkeys(r.path for r in rows))
    for p, style in zip(paths, ("o-", "s--", "^:", "v-.", "d:", "x--"), strict=False):
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


def model_repository(dest: Path, baseline: str | None, variants: list[str]) -> list[str]:
    """A Triton model repository in `dest`: today's llm, REF's as llm_base, and the variants.

    Returns the extra models' names. The baseline is REF's own code (git archive); only its
    config name and its metrics label are renamed so that it can sit beside today's model."""
    src = Path(str(importlib.resources.files("llmesh.triton_models")))
    shutil.copytree(src / "llm", dest / "llm", ignore=shutil.ignore_patterns("__pycache__"))
    extra = []
    if baseline:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", baseline, "triton_models/llm"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        shutil.move(str(dest / "triton_models" / "llm"), str(dest / "llm_base"))
        model_py = dest / "llm_base" / "1" / "model.py"
        model_py.write_text(model_py.read_text().replace('Metrics("llm")', 'Metrics("llm_base")'))
        extra.append("llm_base")
    for spec in variants:
        name, _, pairs = spec.partition(":")
        model = f"llm_{name}"
        shutil.copytree(dest / "llm", dest / model)
        conf = (dest / model / "config.pbtxt").read_text()
        for pair in filter(None, pairs.split(",")):
            key, _, value = pair.partition("=")
            line = f'parameters: {{ key: "{key}", value: {{ string_value: "{value}" }} }}'
            pattern = rf'parameters: \{{ key: "{re.escape(key)}".*\n'
            conf = re.sub(pattern, line + "\n", conf) if re.search(pattern, conf) else conf + line + "\n"
        extra.append(model)
        (dest / model / "config.pbtxt").write_text(conf)
    for model in extra:
        conf_path = dest / model / "config.pbtxt"
        conf_path.write_text(conf_path.read_text().replace('name: "llm"', f'name: "{model}"', 1))
    return extra


def real_lm_path() -> str:
    """The real LM's folder: the repository's converted copy if there is one, else built by the mesh."""
    local = ROOT / "var" / "models" / DEFAULT_LM
    return str(local) if (local / "config.json").is_file() else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, help="use the running mesh of this config instead of a throwaway one")
    ap.add_argument("--levels", default="1,4,16", help="concurrency levels (default 1,4,16)")
    ap.add_argument("--requests", type=int, default=48, help="requests per path and level (default 48)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default 32)")
    ap.add_argument("--model", choices=("tiny", "real"), default="tiny", help="LM of the throwaway mesh")
    ap.add_argument("--llm-path", default="", help="serve this Hugging Face folder instead (throwaway mesh)")
    ap.add_argument("--baseline", metavar="REF", help="also serve REF's triton_models/llm (git ref) as llm_base")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:K=V,...",
        help="also serve today's llm with these parameters",
    )
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    OUT.mkdir(exist_ok=True)
    extra: list[str] = []
    if args.config:
        rows = asyncio.run(bench(load_config(args.config), levels, args.requests, args.max_tokens))
    else:
        from tests.support.sandbox import ephemeral_mesh

        with tempfile.TemporaryDirectory(prefix="llmesh-bench-") as tmp:
            triton_cfg: dict[str, Any] = {}
            if args.model == "real":
                triton_cfg["llm_model"] = DEFAULT_LM
                triton_cfg["llm_path"] = args.llm_path or real_lm_path()
            elif args.llm_path:
                triton_cfg["llm_path"] = args.llm_path
            if args.baseline or args.variant:
                repo = Path(tmp) / "model-repository"
                extra = model_repository(repo, args.baseline, args.variant)
                triton_cfg.update(model_repository=str(repo), models=["llm", *extra])
            overrides = {"triton": triton_cfg} if triton_cfg else None
            with ephemeral_mesh(Path(tmp) / "home", overrides) as (cfg, _):
                rows = asyncio.run(bench(cfg, levels, args.requests, args.max_tokens, extra))
    ratios = report(rows, levels, extra)
    plot(rows, levels, OUT / "inference.png")
    (OUT / "inference.json").write_text(json.dumps({"rows": [asdict(r) for r in rows], "ratios": ratios}, indent=2))
    print(f"\nwrote {OUT / 'inference.png'} and {OUT / 'inference.json'}")


if __name__ == "__main__":
    main()
