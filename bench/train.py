"""Benchmark: the trainer service's training speed against a plain PEFT training script
on the same data and hyperparameters, in one run.

The plain script is the loop anyone would write (tokenize with the same chat template,
LoRA via ``get_peft_model``, AdamW + linear schedule, gradient clipping), run in this
process. The service path is the real thing: a throwaway mesh, the dataset uploaded,
``CreateJob``, the worker process with its progress events, checkpoints and evaluation;
its speed is the worker's own steps/s over the training loop (model loading and the
final evaluation excluded on both sides). Rounds alternate plain/service to spread
the noise of this shared machine. Writes bench/out/train.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from llmesh.pb.trainer.v1 import trainer_pb2_grpc

OUT = Path(__file__).parent / "out"


def plain_steps_per_second(
    model_path: Path,
    pairs: list[dict[str, str]],
    steps: int,
    batch_size: int,
    rank: int,
    lr: float,
    max_length: int,
    seed: int,
) -> float:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

    from llmesh.services.trainer.encoding import collate, encode

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_path)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = get_peft_model(
        base,
        LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    data = [
        encode(
            tok, [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["answer"]}], max_length
        )
        for p in pairs
    ]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, min(10, steps // 10), steps)  # type: ignore[no-untyped-call]  # transformers leaves it untyped
    model.train()
    rng = random.Random(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = rng.sample(range(len(data)), min(batch_size, len(data)))
        loss = model(**collate([data[i] for i in idx], pad)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - t0)


def service_steps_per_second(
    stub: trainer_pb2_grpc.TrainerStub,
    dataset_id: str,
    name: str,
    epochs: int,
    batch_size: int,
    rank: int,
    lr: float,
    max_length: int,
    seed: int,
) -> tuple[float, int]:
    from llmesh.pb.trainer.v1 import trainer_pb2 as pb

    job = stub.CreateJob(
        pb.CreateJobRequest(
            dataset_id=dataset_id,
            adapter_name=name,
            lora=pb.LoraConfig(rank=rank),
            epochs=epochs,
            learning_rate=lr,
            batch_size=batch_size,
            max_length=max_length,
            seed=seed,
        ),
        timeout=30,
    )
    final = None
    for event in stub.WatchJob(pb.GetJobRequest(job_id=job.job_id), timeout=1800):
        final = event.job
    assert final is not None and final.state == pb.JOB_STATE_SUCCEEDED, final
    return final.progress.steps_per_second, final.progress.total_steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="plain/service pairs (default 2)")
    ap.add_argument("--epochs", type=int, default=40, help="epochs over the FAQ's train split (default 40)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    from llmesh.client import local_channel
    from llmesh.client.trainer import upload
    from llmesh.demo.models import faq_pairs
    from llmesh.pb.trainer.v1 import trainer_pb2_grpc
    from tests.support.sandbox import ephemeral_mesh

    lr, max_length, seed = 3e-3, 192, 1
    pairs = faq_pairs()
    OUT.mkdir(exist_ok=True)
    plain, service = [], []
    with tempfile.TemporaryDirectory(prefix="llmesh-bench-") as tmp, ephemeral_mesh(Path(tmp)) as (cfg, _):
        stub = trainer_pb2_grpc.TrainerStub(local_channel(f"127.0.0.1:{cfg.trainer.server.port}", cfg.home))
        ds = upload(stub, json.dumps(pairs, ensure_ascii=False).encode(), "faq.json", eval_fraction=0.1, seed=3)
        for r in range(args.rounds):
            rate, steps = service_steps_per_second(
                stub, ds.dataset_id, f"bench-{r}", args.epochs, args.batch_size, args.rank, lr, max_length, seed
            )
            service.append(rate)
            train_pairs = pairs[: ds.train_examples]
            plain.append(
                plain_steps_per_second(
                    cfg.llm_path, train_pairs, steps, args.batch_size, args.rank, lr, max_length, seed
                )
            )
            print(f"round {r + 1}: {steps} steps, plain {plain[-1]:.1f} steps/s, service {service[-1]:.1f} steps/s")
    p, s = statistics.median(plain), statistics.median(service)
    print(
        f"\n{'path':<10} {'steps/s (median)':>18}\n{'plain':<10} {p:>18.1f}\n{'service':<10} {s:>18.1f}\n"
        f"\nservice / plain: {s / p:.2f} (goal >= 0.9)"
    )
    (OUT / "train.json").write_text(
        json.dumps(
            {"plain": plain, "service": service, "ratio": s / p, "steps": steps, "epochs": args.epochs}, indent=2
        )
    )
    print(f"wrote {OUT / 'train.json'}")


if __name__ == "__main__":
    main()
