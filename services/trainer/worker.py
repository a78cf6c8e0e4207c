"""One training job in its own process: ``python -m llmesh.services.trainer.worker JOB_ID``
(config from ``LLMESH_CONFIG`` / ``LLMESH_HOME``, like the services).

The service starts a worker per job, so a crash (out of memory, a bad kernel) takes
down only the job. Progress, events and the outcome go to the trainer database.
Every ``checkpoint_every_steps`` the adapter, optimizer, scheduler and RNG states are
saved (atomically) to ``trainer/jobs/<id>/checkpoint``; a restarted worker resumes
from there. SIGTERM checkpoints and exits with ``EXIT_INTERRUPTED`` (the job stays
queued); a cancel request stops the job at the next step.

Exit codes: 0 the job reached a final state (succeeded/failed/cancelled, recorded);
75 interrupted (resume later); anything else: a crash the service counts as an attempt.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import sqlite3
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

EXIT_INTERRUPTED = 75
# Projections LoRA targets per architecture family, in order of preference.
TARGETS = (
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),  # llama, qwen, mistral
    ("c_attn", "c_proj", "c_fc"),  # gpt2
    ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),  # bloom, falcon, gpt-neox
)


def detect_target_modules(model: Any) -> list[str]:
    import torch

    leaves = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for family in TARGETS:
        found = [t for t in family if t in leaves]
        if found:
            return found
    return sorted(leaves - {"lm_head"})


def load_base(path: str, *, qlora: bool) -> Any:
    """The base model: float32 (on the GPU when there is one); with ``qlora`` (the service admits it only when a
    CUDA GPU and bitsandbytes are present) 4-bit NF4 weights with bf16 compute on the GPU,
    prepared for k-bit training — QLoRA (Dettmers et al., 2023)."""
    import torch
    from transformers import AutoModelForCausalLM

    if not qlora:
        model: Any = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
        return model.to("cuda") if torch.cuda.is_available() else model
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(  # type: ignore[no-untyped-call]  # unannotated in transformers
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map={"": 0})
    return prepare_model_for_kbit_training(model)  # type: ignore[no-untyped-call]  # unannotated in peft


class Interrupted(Exception):
    pass


class EarlyStop:
    """Generalise mode: held-out loss every ``every`` steps; stop after ``patience``
    evaluations without improvement, keeping the adapter weights of the best one."""

    def __init__(self, every: int, patience: int) -> None:
        self.every, self.patience = every, patience
        self.best_loss = math.inf
        self.best_step = 0
        self.misses = 0
        self.best: dict[str, Any] | None = None  # the trainable (LoRA) tensors at best_step
        self.evals: list[list[float]] = []  # [step, held-out loss]

    def due(self, step: int, total: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == total)

    def record(self, step: int, loss: float, model: Any) -> bool:
        """Note the held-out loss at ``step``; True when training should stop."""
        from peft import get_peft_model_state_dict

        self.evals.append([step, loss])
        if loss < self.best_loss:
            self.best_loss, self.best_step, self.misses = loss, step, 0
            self.best = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        else:
            self.misses += 1
        return self.patience > 0 and self.misses >= self.patience

    def restore_best(self, model: Any) -> None:
        from peft import set_peft_model_state_dict

        if self.best is not None:
            set_peft_model_state_dict(model, self.best)

    def state(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("best_loss", "best_step", "misses", "best", "evals")}

    def load(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


class Job:
    """The running job's view of the database."""

    def __init__(self, conn: sqlite3.Connection, job_id: str) -> None:
        from llmesh.services.trainer.store import job_row

        self.conn = conn
        self.id = job_id
        row = job_row(conn, job_id)
        if row is None:
            raise SystemExit(f"no job {job_id}")
        self.row = row
        self.params: dict[str, Any] = json.loads(row["params"])

    def update(self, event: tuple[str, str] | None = None, **fields: Any) -> None:
        from llmesh.services.trainer.store import update_job

        update_job(self.conn, self.id, event, **fields)

    def cancelled(self) -> bool:
        row = self.conn.execute("SELECT cancel_requested FROM jobs WHERE job_id = ?", (self.id,)).fetchone()
        return bool(row["cancel_requested"])


def _save_checkpoint(
    path: Path, model: Any, optimizer: Any, scheduler: Any, step: int, losses: list[list[float]], stopper: EarlyStop
) -> None:
    import torch

    from llmesh.runtime.files import publish_dir

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "adapter")
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "losses": losses,
            "early_stop": stopper.state(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        },
        tmp / "state.pt",
    )
    publish_dir(tmp, path, replace=True)  # the new checkpoint is complete (fsynced) before the old one goes


def train(cfg: Any, job: Job) -> None:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup

    from llmesh.adapter_store import folder
    from llmesh.services.trainer import registry
    from llmesh.services.trainer.datasets import from_jsonl
    from llmesh.services.trainer.encoding import collate, encode, prompt_format
    from llmesh.services.trainer.evaluate import evaluate, held_out_loss, loss_curve_png
    from llmesh.services.trainer.plan import GENERALISE, MEMORISE

    p = job.params
    work = cfg.trainer_dir / "jobs" / job.id
    work.mkdir(parents=True, exist_ok=True)
    data_dir = cfg.trainer_dir / "datasets" / job.row["dataset_id"]
    train_set = [ex.as_dicts() for ex in from_jsonl((data_dir / "train.jsonl").read_bytes())]
    eval_set = [ex.as_dicts() for ex in from_jsonl((data_dir / "eval.jsonl").read_bytes())]
    mode = p.get("mode", GENERALISE)  # jobs queued before plans existed trained and evaluated on the split
    if mode == MEMORISE:  # every row is trained on, and the evaluation is their reproduction
        train_set = eval_set = train_set + eval_set
    split = "train" if mode == MEMORISE else "held_out"
    torch.manual_seed(p["seed"])
    random.seed(p["seed"])

    base_path = str(cfg.llm_path)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if p.get("prompt_format") != prompt_format(tokenizer):
        p["prompt_format"] = prompt_format(tokenizer)
        job.update(params=p)
    base = load_base(base_path, qlora=p["qlora"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [encode(tokenizer, m, p["max_length"], p["response_only_loss"]) for m in train_set]
    plan = p.get("plan", {})
    stopper = EarlyStop(plan.get("eval_every_steps", 0), plan.get("patience", 0))

    checkpoint = work / "checkpoint"
    resumed = checkpoint.is_dir()
    if resumed:
        model = PeftModel.from_pretrained(base, checkpoint / "adapter", is_trainable=True)
    else:
        targets = p["target_modules"] or detect_target_modules(base)
        p["target_modules"] = targets
        model = get_peft_model(
            base,
            LoraConfig(
                r=p["rank"],
                lora_alpha=p["alpha"],
                lora_dropout=p["dropout"],
                target_modules=targets,
                task_type="CAUSAL_LM",
            ),
        )
    params = [x for x in model.parameters() if x.requires_grad]
    device = params[0].device
    optimizer = torch.optim.AdamW(params, lr=p["learning_rate"], weight_decay=0.0)
    per_epoch = math.ceil(len(encoded) / p["batch_size"])
    total = p.get("steps") or per_epoch * p["epochs"]
    if p["max_steps"]:
        total = min(total, p["max_steps"])
    scheduler = get_linear_schedule_with_warmup(optimizer, min(10, total // 10), total)  # type: ignore[no-untyped-call]  # unannotated in transformers
    step, losses = 0, []
    if resumed:
        state = torch.load(checkpoint / "state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, losses = state["step"], state["losses"]
        stopper.load(state.get("early_stop", {}))
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        job.update(("resumed", f"from the checkpoint at step {step}"))
    else:
        job.update(
            (
                "started",
                f"{len(encoded)} examples ({p['prompt_format']} prompts), {total} steps, "
                f"LoRA r={p['rank']} on {', '.join(p['target_modules'])}",
            )
        )

    stop = {"term": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(term=True))
    model.train()
    t0, done_at_start, last_report = time.monotonic(), step, 0.0
    while step < total:
        epoch = step // per_epoch
        order = list(range(len(encoded)))
        random.Random(p["seed"] + epoch).shuffle(order)  # the same order when resumed
        i = step % per_epoch
        batch = collate([encoded[j] for j in order[i * p["batch_size"] : (i + 1) * p["batch_size"]]], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append([step, float(loss.item())])
        early_stop = False
        if stopper.due(step, total):
            held = held_out_loss(model, tokenizer, eval_set, max_length=p["max_length"])
            early_stop = stopper.record(step, held, model)
            job.update(
                (
                    "checked",
                    f"step {step}: held-out loss {held:.4f} (best {stopper.best_loss:.4f} at step {stopper.best_step})",
                )
            )
        now = time.monotonic()
        if now - last_report > 0.5 or step == total or early_stop:
            last_report = now
            rate = (step - done_at_start) / max(1e-6, now - t0)
            progress = {
                "step": step,
                "total_steps": total,
                "epoch": epoch + 1,
                "loss": losses[-1][1],
                "learning_rate": scheduler.get_last_lr()[0],
                "steps_per_second": rate,
                "eta_seconds": (total - step) / rate if rate else 0.0,
            }
            job.update(("progress", f"step {step}/{total} loss {losses[-1][1]:.4f}"), progress=progress)
            if job.cancelled():
                job.update(("cancelled", f"cancelled at step {step}"), state="cancelled", finished_at=time.time())
                return
        if step % cfg.trainer.checkpoint_every_steps == 0 or stop["term"]:
            _save_checkpoint(checkpoint, model, optimizer, scheduler, step, losses, stopper)
        if stop["term"]:
            raise Interrupted(f"stopped at step {step} (checkpointed)")
        if early_stop:
            job.update(
                (
                    "stopped",
                    f"early stopping at step {step}: {stopper.misses} evaluations without held-out improvement; "
                    f"keeping step {stopper.best_step}",
                )
            )
            break
    stopper.restore_best(model)

    limit = cfg.trainer.eval_generate_limit
    evaluated = eval_set[:limit]
    # An answer longer than its reference plus a margin cannot match it exactly: no point generating on.
    new_tokens = min(128, max(len(tokenizer(m[-1]["content"])["input_ids"]) for m in evaluated) + 16)
    with model.disable_adapter():
        base_metrics = evaluate(model, tokenizer, evaluated, max_length=p["max_length"], max_new_tokens=new_tokens)
    tuned_metrics = evaluate(model, tokenizer, evaluated, max_length=p["max_length"], max_new_tokens=new_tokens)
    base_eval = asdict(base_metrics) | {"split": split}
    tuned_eval = asdict(tuned_metrics) | {"split": split}
    n = tuned_metrics.examples
    if mode == MEMORISE:
        threshold = plan.get("pass_exact_match", 0.0)
        passed = tuned_metrics.exact_match >= threshold
        verdict = (
            f"reproduced {round(tuned_metrics.exact_match * n)}/{n} training answers exactly "
            f"(base {round(base_metrics.exact_match * n)}/{n}): {'pass' if passed else 'FAIL'} "
            f"(needs {threshold:.0%})"
        )
    else:
        passed = tuned_metrics.loss < base_metrics.loss
        verdict = (
            f"held-out loss base {base_metrics.loss:.3f} → adapter {tuned_metrics.loss:.3f}, "
            f"ROUGE-L {base_metrics.rouge_l:.3f} → {tuned_metrics.rouge_l:.3f} on {n} held-out rows"
        )
    outcome = {"passed": passed, "best_step": stopper.best_step, "steps_run": step}
    job.update(("evaluated", verdict), base_eval=base_eval, tuned_eval=tuned_eval, outcome=outcome)

    staged = work / "staged"
    shutil.rmtree(staged, ignore_errors=True)
    model.save_pretrained(staged)
    figure = (
        f"reproduced {tuned_metrics.exact_match:.0%} of training answers"
        if mode == MEMORISE
        else f"held-out loss {base_metrics.loss:.2f} → {tuned_metrics.loss:.2f}"
    )
    loss_curve_png(
        [(s, v) for s, v in losses],
        [(int(s), v) for s, v in stopper.evals] or [(step, tuned_metrics.loss)],
        staged / "loss.png",
        f"{p['adapter_name']} ({job.id}): {figure}",
    )
    lineage = {
        "job_id": job.id,
        "base_model": base_path,
        "dataset_id": job.row["dataset_id"],
        "prompt_format": p["prompt_format"],
        "hyperparameters": p,
        "base": base_eval,
        "tuned": tuned_eval,
        "outcome": outcome,
    }
    (staged / "lineage.json").write_text(json.dumps(lineage, indent=1, ensure_ascii=False))
    version = registry.register(
        job.conn,
        cfg.adapter_dir,
        staged,
        name=p["adapter_name"],
        job_id=job.id,
        base_model=base_path,
        base_sha=registry.model_fingerprint(cfg.llm_path),
        dataset_id=job.row["dataset_id"],
        hyperparameters={k: str(v) for k, v in p.items() if k not in ("plan", "summary")},
        base_eval=base_eval,
        tuned_eval=tuned_eval,
        min_improvement=p["min_improvement"],
        created_by=job.row["created_by"],
        prompt_format=p["prompt_format"],
    )
    ref = folder(p["adapter_name"], version)
    job.update(("succeeded", f"published {ref}"), state="succeeded", adapter_ref=ref, finished_at=time.time())
    shutil.rmtree(checkpoint, ignore_errors=True)


def main() -> None:
    from llmesh.config import load_config
    from llmesh.services.trainer.store import worker_connection

    job_id = sys.argv[1]
    cfg = load_config()
    conn = worker_connection(cfg.trainer_dir / "trainer.db")
    job = Job(conn, job_id)
    try:
        train(cfg, job)
    except Interrupted as e:
        job.update(("interrupted", str(e)))
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # a failure of this job, recorded; not a crash of the worker
        traceback.print_exc()  # the class and traceback go to the trainer's log only
        reason = f"training failed: {e}" if str(e) else "training failed (see llmesh logs trainer)"
        job.update(("failed", reason), state="failed", error=reason, finished_at=time.time())


if __name__ == "__main__":
    main()
