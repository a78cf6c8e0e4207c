"""Benchmark: the trainer's defaults, before vs after, on the real LM (SmolLM2-135M-Instruct).

One throwaway mesh serving the real default LM; through the trainer's gRPC API (upload,
``CreateJob``, ``WatchJob``) each round runs three jobs:

  faq-old      the bundled 20-pair FAQ, memorise, the old defaults given explicitly
               (3 epochs, lr 2e-4, batch 8, LoRA r=8)
  faq-new      the same FAQ with no options (the new defaults: memorise)
  tickets-new  the generated 60-row ticket set with no options (generalise: 10% held out,
               early stopping)

Memorise jobs report the training answers reproduced exactly (greedy) by the adapter and
by the base model; the generalising job the held-out loss, ROUGE-L and exact match of both.
"training s" is the worker's own loop time (steps run / its steps/s: model loading and the
final evaluation excluded, periodic held-out checks included); "wall s" is CreateJob to the
final event. Per case: median and min-max over the rounds. Writes bench/out/train_defaults.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.inference import real_lm_path
from llmesh.pb.trainer.v1 import trainer_pb2 as pb
from llmesh.pb.trainer.v1 import trainer_pb2_grpc

OUT = Path(__file__).parent / "out"


def run_job(stub: trainer_pb2_grpc.TrainerStub, request: pb.CreateJobRequest) -> dict[str, Any]:
    """Run one job to its end; its figures as a flat dict."""
    t0 = time.monotonic()
    job = stub.CreateJob(request, timeout=30)
    final = None
    for event in stub.WatchJob(pb.GetJobRequest(job_id=job.job_id), timeout=3600):
        final = event.job
    wall = time.monotonic() - t0
    assert final is not None and final.state == pb.JOB_STATE_SUCCEEDED, final
    prog, base, tuned = final.progress, final.base, final.tuned
    n = tuned.examples
    return {
        "job_id": final.job_id,
        "mode": pb.TrainingMode.Name(final.plan.mode),
        "plan": final.plan.reason,
        "planned_steps": final.plan.steps,
        "steps": prog.step,
        "best_step": final.best_step,
        "batch_size": final.plan.batch_size,
        "learning_rate": final.plan.learning_rate,
        "rank": final.plan.rank,
        "training_s": prog.step / prog.steps_per_second if prog.steps_per_second else float("nan"),
        "wall_s": wall,
        "examples": n,
        "split": tuned.split,
        "passed": final.passed,
        "base": {"loss": base.loss, "rouge_l": base.rouge_l, "exact_match": base.exact_match},
        "tuned": {"loss": tuned.loss, "rouge_l": tuned.rouge_l, "exact_match": tuned.exact_match},
        "base_exact": round(base.exact_match * n),
        "tuned_exact": round(tuned.exact_match * n),
    }


def save(runs: dict[str, list[dict[str, Any]]], loads: list[tuple[float, float, float]], rounds: int) -> None:
    (OUT / "train_defaults.json").write_text(
        json.dumps({"rounds": rounds, "runs": runs, "loadavg": loads}, indent=2, ensure_ascii=False)
    )


def spread(values: list[float], fmt: str) -> str:
    """median (min-max) of ``values``, or the value alone for one round."""
    med = format(statistics.median(values), fmt)
    if len(values) == 1:
        return med
    return f"{med} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def table(
    title: str, runs: list[dict[str, Any]], columns: list[tuple[str, Callable[[dict[str, Any]], float], str]]
) -> str:
    rows = [f"\n{title} ({len(runs)} rounds; median (min-max))"]
    rows += [f"  {name:<28} {spread([get(r) for r in runs], fmt)}" for name, get, fmt in columns]
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the three jobs (default 2)")
    ap.add_argument("--cases", default="faq-old,faq-new,tickets-new", help="which jobs (default all three)")
    args = ap.parse_args()
    from llmesh.client import local_channel
    from llmesh.client.trainer import upload
    from llmesh.demo.catalog import DEFAULT_LM
    from llmesh.demo.models import faq_pairs
    from tests.support.sandbox import ephemeral_mesh
    from tests.support.tickets import ticket_rows

    OUT.mkdir(exist_ok=True)
    seed = 1
    runs: dict[str, list[dict[str, Any]]] = {"faq-old": [], "faq-new": [], "tickets-new": []}
    loads: list[tuple[float, float, float]] = [os.getloadavg()]
    overrides = {"triton": {"llm_model": DEFAULT_LM, "llm_path": real_lm_path()}}
    with (
        tempfile.TemporaryDirectory(prefix="llmesh-bench-") as tmp,
        ephemeral_mesh(Path(tmp) / "home", overrides) as (cfg, _),
    ):
        stub = trainer_pb2_grpc.TrainerStub(local_channel(f"127.0.0.1:{cfg.trainer.server.port}", cfg.home))
        faq = upload(stub, json.dumps(faq_pairs(), ensure_ascii=False).encode(), "faq.json")
        tickets = upload(stub, json.dumps(ticket_rows(60), ensure_ascii=False).encode(), "tickets.json")
        print(
            f"LM {cfg.llm_path}; faq {faq.train_examples}+{faq.eval_examples} rows, "
            f"tickets {tickets.train_examples}+{tickets.eval_examples} rows"
        )
        requests = {
            "faq-old": pb.CreateJobRequest(
                dataset_id=faq.dataset_id,
                lora=pb.LoraConfig(rank=8),
                epochs=3,
                learning_rate=2e-4,
                batch_size=8,
                mode=pb.TRAINING_MODE_MEMORISE,
                seed=seed,
            ),
            "faq-new": pb.CreateJobRequest(dataset_id=faq.dataset_id, seed=seed),
            "tickets-new": pb.CreateJobRequest(dataset_id=tickets.dataset_id, seed=seed),
        }
        for r in range(args.rounds):
            for case in args.cases.split(","):
                request = requests[case]
                req = pb.CreateJobRequest()
                req.CopyFrom(request)
                req.adapter_name = f"bench-{case}-{r}"
                res = run_job(stub, req)
                res["load"] = os.getloadavg()
                loads.append(res["load"])
                runs[case].append(res)
                print(
                    f"round {r + 1} {case}: {res['mode']} {res['steps']}/{res['planned_steps']} steps "
                    f"(best {res['best_step']}), training {res['training_s']:.0f} s, wall {res['wall_s']:.0f} s, "
                    f"exact {res['base_exact']}/{res['examples']} -> {res['tuned_exact']}/{res['examples']}, "
                    f"loss {res['base']['loss']:.3f} -> {res['tuned']['loss']:.3f}, "
                    f"ROUGE-L {res['base']['rouge_l']:.3f} -> {res['tuned']['rouge_l']:.3f}, "
                    f"load {res['load'][0]:.1f}",
                    flush=True,
                )
                save(runs, loads, r + 1)  # after every job: a run cut short keeps what it measured

    time_cols: list[tuple[str, Callable[[dict[str, Any]], float], str]] = [
        ("steps", lambda r: r["steps"], ".0f"),
        ("training s (worker loop)", lambda r: r["training_s"], ".0f"),
        ("wall s (CreateJob->final)", lambda r: r["wall_s"], ".0f"),
    ]
    for case in [c for c in ("faq-old", "faq-new") if runs[c]]:
        n = runs[case][0]["examples"]
        print(
            table(
                f"{case}: memorise, exact reproduction of the {n} training answers",
                runs[case],
                [
                    *time_cols,
                    (f"reproduced k/{n} (adapter)", lambda r: r["tuned_exact"], ".0f"),
                    (f"reproduced k/{n} (base)", lambda r: r["base_exact"], ".0f"),
                ],
            )
        )
    t = runs["tickets-new"]
    if t:
        print(
            table(
                f"tickets-new: generalise, {t[0]['examples']} held-out rows",
                t,
                [
                    *time_cols[:1],
                    ("best_step", lambda r: r["best_step"], ".0f"),
                    *time_cols[1:],
                    ("held-out loss base", lambda r: r["base"]["loss"], ".3f"),
                    ("held-out loss adapter", lambda r: r["tuned"]["loss"], ".3f"),
                    ("ROUGE-L base", lambda r: r["base"]["rouge_l"], ".3f"),
                    ("ROUGE-L adapter", lambda r: r["tuned"]["rouge_l"], ".3f"),
                    ("exact match base", lambda r: r["base"]["exact_match"], ".2f"),
                    ("exact match adapter", lambda r: r["tuned"]["exact_match"], ".2f"),
                ],
            )
        )
    load1 = [x[0] for x in loads]
    print(f"\nload average (1 min) during the run: {min(load1):.1f}-{max(load1):.1f}")
    save(runs, loads, args.rounds)
    print(f"wrote {OUT / 'train_defaults.json'}")


if __name__ == "__main__":
    main()
