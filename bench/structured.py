"""Benchmark: structured-output engines — grammar compile time and per-token mask cost.

For every candidate engine that is installed (llguidance, outlines-core, lm-format-enforcer,
xgrammar), every tokenizer (the real SmolLM2, vocab 49152, and the tiny test LM) and every
format (a bounded JSON schema with strings, numbers, arrays and enums; a choice list; a
regex), it measures:
  - tokenizer set-up: the engine's one-off preprocessing of the vocabulary;
  - compile: the format → a ready matcher (first compile, nothing cached);
  - mask µs/token: computing the allowed-token mask, applying it to the logits, sampling and
    advancing the matcher, minus plain sampling of the same logits (temperature 1, the
    model's llm_sampling path) measured interleaved in the same run; the outputs are walks
    of the grammar driven by random logits, restarted when a walk completes.
llguidance is measured through the model's own code (triton_models/llm/1/llm_constraints).
With --model, one decode step of the real model (batch 1, KV cache) is timed as well, so the
mask cost can be read as a share of a token's cost. Choice lists are scored, not decoded, in
the model (llm_choices); here they are decoded as an alternation regex to compare engines.

xgrammar's wheel pulls the `triton` GPU compiler; it is measured from a --no-deps folder:
  pip install --no-deps --target /tmp/xgr xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2
  PYTHONPATH=/tmp/xgr python -m bench.structured
Writes bench/out/structured.json and .png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "out"
MODEL_DIR = ROOT / "triton_models" / "llm" / "1"
TOKENIZERS = {"smollm2": ROOT / "var/models/smollm2-135m-instruct", "tiny": ROOT / "var/models/tiny-qwen2"}
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "level": {"enum": ["low", "medium", "high"]},
    },
    "required": ["name", "age", "score", "tags", "level"],
    "additionalProperties": False,
}
CHOICES = ["positive", "negative", "neutral", "mixed"]
FORMATS: dict[str, dict[str, Any]] = {
    "schema": {"type": "json_schema", "schema": SCHEMA},
    "choice": {"type": "regex", "pattern": "(" + "|".join(CHOICES) + ")"},
    "regex": {"type": "regex", "pattern": r"[A-Z]{2}-\d{4}-[a-z]{3,8}"},
}


class Walk:
    """One engine's matcher for one format: mask, advance, completion."""

    allowed: Callable[[], torch.Tensor]  # bool [vocab]
    advance: Callable[[int], None]
    done: Callable[[], bool]


@dataclass
class Result:
    engine: str
    tokenizer: str
    format: str
    setup_s: float
    compile_ms: float
    mask_us: float  # constrained minus plain, per token (median over chunks)
    engine_us: float  # of which in the engine's own calls (mask, advance), per token
    plain_us: float
    tokens: int
    walks: int
    error: str = ""


# ---------------------------------------------------------------- engines


def _model_modules() -> None:
    """The llm model's modules importable here (with the test fake of Triton's utils)."""
    if "triton_python_backend_utils" not in sys.modules:
        from tests.support.triton_llm import fake_pb_utils

        sys.modules["triton_python_backend_utils"] = fake_pb_utils()
    if str(MODEL_DIR) not in sys.path:
        sys.path.append(str(MODEL_DIR))


def _bool_from_words(words: torch.Tensor, vocab: int) -> torch.Tensor:
    bits = np.unpackbits(words.numpy().view(np.uint8), bitorder="little")[:vocab]
    return torch.from_numpy(bits.view(np.bool_))


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok: Any, vocab: int) -> None:
        _model_modules()
        import llm_constraints  # type: ignore[import-not-found]  # the llm model's folder, put on sys.path at run time as Triton does

        self.grammars = llm_constraints.Grammars(tok)
        self.grammars.lltokenizer()

    def compile(self, fmt: dict[str, Any]) -> Callable[[], Walk]:
        self.grammars.compile(fmt)

        def walk() -> Walk:
            m = self.grammars.matcher(fmt)
            w = Walk()
            w.allowed, w.done = m.allowed, m.done
            w.advance = m.consume
            return w

        return walk


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok: Any, vocab: int) -> None:
        import outlines_core  # optional bench engine (pyproject: untyped or absent)

        _model_modules()
        from llm_text import token_bytes  # type: ignore[import-not-found]  # (the model folder, on sys.path)

        self.oc = outlines_core
        self.eos = int(tok.eos_token_id)
        table: dict[bytes, list[int]] = {}
        for i, b in enumerate(token_bytes(tok, vocab)):
            if b and i != self.eos:
                table.setdefault(b, []).append(i)
        self.vocab_n = vocab
        self.vocabulary = outlines_core.Vocabulary(self.eos, table)

    def compile(self, fmt: dict[str, Any]) -> Callable[[], Walk]:
        if fmt["type"] == "json_schema":
            regex = self.oc.json_schema.build_regex_from_schema(json.dumps(fmt["schema"]))
        else:
            regex = fmt["pattern"]
        index = self.oc.Index(regex, self.vocabulary)
        words_n = (self.vocab_n + 31) // 32

        def walk() -> Walk:
            g = self.oc.Guide(index)
            words = torch.zeros(words_n, dtype=torch.int32)
            w = Walk()

            def allowed() -> torch.Tensor:
                g.write_mask_into(words.data_ptr(), words.numel(), 4)
                return _bool_from_words(words, self.vocab_n)

            w.allowed = allowed
            w.advance = lambda t: None if t == self.eos else g.advance(t, return_tokens=False)
            w.done = lambda: bool(g.is_finished())
            return w

        return walk


class FormatEnforcer:
    name = "lm-format-enforcer"

    def __init__(self, tok: Any, vocab: int) -> None:
        from lmformatenforcer import JsonSchemaParser, RegexParser, TokenEnforcer  # optional bench engine
        from lmformatenforcer.tokenenforcer import TokenEnforcerTokenizerData

        # its transformers integration does not import with transformers 5.x: built by hand
        _model_modules()
        from llm_text import token_bytes

        special = set(tok.all_special_ids)
        regular = []
        for i, b in enumerate(token_bytes(tok, len(tok))):
            if b and i not in special:
                s = b.decode("utf-8", errors="replace")
                regular.append((i, s, s.startswith(" ")))
        self.eos = int(tok.eos_token_id)
        self.vocab_n = vocab
        self.data = TokenEnforcerTokenizerData(regular, tok.decode, self.eos, False, vocab)
        self.parsers = (JsonSchemaParser, RegexParser, TokenEnforcer)

    def compile(self, fmt: dict[str, Any]) -> Callable[[], Walk]:
        json_parser, regex_parser, enforcer = self.parsers
        parser = json_parser(fmt["schema"]) if fmt["type"] == "json_schema" else regex_parser(fmt["pattern"])

        def walk() -> Walk:
            te = enforcer(self.data, parser)
            seq: list[int] = []
            state = {"ended": False}
            w = Walk()

            def allowed() -> torch.Tensor:
                got = te.get_allowed_tokens(seq)
                ids = list(getattr(got, "allowed_tokens", got))
                mask = torch.zeros(self.vocab_n, dtype=torch.bool)
                mask[torch.tensor(ids, dtype=torch.long)] = True
                return mask

            def advance(t: int) -> None:
                seq.append(t)
                state["ended"] = t == self.eos

            w.allowed, w.advance = allowed, advance
            w.done = lambda: state["ended"]
            return w

        return walk


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok: Any, vocab: int) -> None:
        import xgrammar  # optional: measured from a --target folder

        self.xgr = xgrammar
        self.vocab_n = vocab
        self.compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=vocab))

    def compile(self, fmt: dict[str, Any]) -> Callable[[], Walk]:
        if fmt["type"] == "json_schema":
            compiled = self.compiler.compile_json_schema(json.dumps(fmt["schema"]), any_whitespace=False)
        else:
            compiled = self.compiler.compile_regex(fmt["pattern"])

        def walk() -> Walk:
            m = self.xgr.GrammarMatcher(compiled)
            words = self.xgr.allocate_token_bitmask(1, self.vocab_n)
            w = Walk()

            def allowed() -> torch.Tensor:
                m.fill_next_token_bitmask(words)
                return _bool_from_words(words[0], self.vocab_n)

            w.allowed, w.done = allowed, lambda: bool(m.is_terminated())
            w.advance = lambda t: None if m.is_terminated() else m.accept_token(t)
            return w

        return walk


ENGINES: list[Any] = [LLGuidance, OutlinesCore, FormatEnforcer, XGrammar]


# ---------------------------------------------------------------- measurement


def _plain(logits: torch.Tensor, gen: torch.Generator) -> int:
    return int(torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=gen).item())


def measure(
    walk_of: Callable[[], Walk], pool: list[torch.Tensor], eos: int, tokens: int
) -> tuple[float, float, float, int]:
    """(constrained minus plain µs/token, engine µs/token, plain µs/token, completed walks),
    plain and constrained chunks interleaved."""
    gen = torch.Generator().manual_seed(0)
    chunk, over, plain, inside = 25, [], [], []
    w, walks, k = walk_of(), 0, 0
    for _ in range(max(1, tokens // chunk)):
        t0 = time.perf_counter()
        for _ in range(chunk):
            _plain(pool[k % len(pool)], gen)
            k += 1
        t_plain = (time.perf_counter() - t0) / chunk
        t0, t_eng = time.perf_counter(), 0.0
        for _ in range(chunk):
            if w.done():
                w.advance(eos)
                w, walks = walk_of(), walks + 1
            logits = pool[k % len(pool)]
            t1 = time.perf_counter()
            allowed = w.allowed()
            t_eng += time.perf_counter() - t1
            n = logits.shape[0]
            if allowed.shape[0] < n:
                allowed = torch.cat([allowed, torch.zeros(n - allowed.shape[0], dtype=torch.bool)])
            tok = _plain(logits.masked_fill(~allowed[:n], float("-inf")), gen)
            t1 = time.perf_counter()
            w.advance(tok)
            t_eng += time.perf_counter() - t1
            k += 1
        t_con = (time.perf_counter() - t0) / chunk
        plain.append(t_plain * 1e6)
        over.append((t_con - t_plain) * 1e6)
        inside.append(t_eng / chunk * 1e6)
    return statistics.median(over), statistics.median(inside), statistics.median(plain), walks


def model_step_ms(path: Path, steps: int = 20) -> float:
    """One decode step of the real model at batch 1 (KV cache), median ms."""
    from transformers import AutoModelForCausalLM

    lm: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    lm.eval()
    times = []
    with torch.inference_mode():
        out = lm(input_ids=torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), use_cache=True)
        cache = out.past_key_values
        for i in range(steps):
            t0 = time.perf_counter()
            out = lm(input_ids=torch.tensor([[10 + i]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoConfig, AutoTokenizer

    torch.set_num_threads(args.threads)
    results: list[Result] = []
    step_ms: dict[str, float] = {}
    for tname, path in TOKENIZERS.items():
        if not path.is_dir():
            print(f"skip tokenizer {tname}: {path} is not there")
            continue
        tok = AutoTokenizer.from_pretrained(str(path))
        vocab = int(AutoConfig.from_pretrained(str(path)).vocab_size)
        g = torch.Generator().manual_seed(1)
        pool = [torch.randn(vocab, generator=g) * 3 for _ in range(64)]
        for engine in ENGINES:
            try:
                t0 = time.perf_counter()
                eng = engine(tok, vocab)
                setup = time.perf_counter() - t0
            except ImportError as exc:
                print(f"skip {engine.name}: not installed ({exc.name})")
                continue
            for fname, fmt in FORMATS.items():
                try:
                    t0 = time.perf_counter()
                    walk_of = eng.compile(fmt)
                    walk_of().allowed()  # engines that compile lazily pay it on the first mask
                    compile_ms = (time.perf_counter() - t0) * 1e3
                    mask_us, eng_us, plain_us, walks = measure(walk_of, pool, int(tok.eos_token_id), args.tokens)
                    r = Result(
                        engine.name, tname, fname, setup, compile_ms, mask_us, eng_us, plain_us, args.tokens, walks
                    )
                except Exception as exc:  # one engine failing a format is a result too
                    r = Result(engine.name, tname, fname, setup, 0.0, 0.0, 0.0, 0.0, 0, 0, error=str(exc)[:200])
                results.append(r)
                print(
                    f"{r.engine:<19} {r.tokenizer:<8} {r.format:<7} setup {r.setup_s:6.2f} s  "
                    f"compile {r.compile_ms:9.1f} ms  mask {r.mask_us:8.1f} µs/token (engine {r.engine_us:8.1f})  "
                    f"(plain sampling {r.plain_us:6.1f} µs, {r.walks} walks) {r.error}",
                    flush=True,
                )
        if args.model:
            step_ms[tname] = model_step_ms(path)
            print(f"{tname}: one decode step of the model (batch 1) {step_ms[tname]:.2f} ms")
    return {"results": [asdict(r) for r in results], "model_step_ms": step_ms, "tokens": args.tokens}


def table(doc: dict[str, Any]) -> str:
    lines = [
        "| engine | tokenizer | format | setup s | compile ms | mask µs/token | in engine | plain µs/token |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in doc["results"]:
        if r["error"]:
            lines.append(f"| {r['engine']} | {r['tokenizer']} | {r['format']} | failed: {r['error'][:60]} |||||")
            continue
        lines.append(
            f"| {r['engine']} | {r['tokenizer']} | {r['format']} | {r['setup_s']:.2f} | {r['compile_ms']:.1f} "
            f"| {r['mask_us']:.0f} | {r['engine_us']:.0f} | {r['plain_us']:.0f} |"
        )
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["results"] if not r["error"]]
    engines = sorted({r["engine"] for r in rows})
    labels = sorted({f"{r['tokenizer']}/{r['format']}" for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / max(1, len(engines))
    for k, e in enumerate(engines):
        by = {f"{r['tokenizer']}/{r['format']}": r for r in rows if r["engine"] == e}
        xs = [i + k * width for i in range(len(labels))]
        axes[0].bar(xs, [max(1e-1, by[x]["mask_us"]) if x in by else 0 for x in labels], width, label=e)
        axes[1].bar(xs, [max(1e-1, by[x]["compile_ms"]) if x in by else 0 for x in labels], width, label=e)
    for ax, title in zip(axes, ["mask cost, µs/token (log)", "compile, ms (log)"], strict=True):
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=30, ha="right")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=300, help="decoded tokens per engine, tokenizer and format")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (masks are single-threaded)")
    ap.add_argument("--model", action="store_true", help="also time one decode step of each model")
    args = ap.parse_args()
    doc = run(args)
    print(table(doc))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "structured.json").write_text(json.dumps(doc, indent=2))
    plot(doc, OUT / "structured.png")
    print(f"wrote {OUT / 'structured.json'} and structured.png")


if __name__ == "__main__":
    main()
