"""What a job chooses when the request leaves fields unset (memorise a small dataset,
generalise from a large one with early stopping, explicit values win), the plan as the
Job shows it, and the prompt format from training to serving: the end-of-turn token
training appends, and an adapter recorded ``raw`` getting a raw prompt from the
inference service."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, cast

import pytest

from llmesh.adapter_store import Announced
from llmesh.config import load_config
from llmesh.pb.inference.v1 import inference_pb2 as ipb
from llmesh.pb.trainer.v1 import trainer_pb2 as pb
from llmesh.runtime.errors import InvalidArgument
from llmesh.runtime.identity import IDENTITY_KEY, InternalIdentity, Principal
from llmesh.services.inference.servicer import InferenceServicer
from llmesh.services.inference.templates import TemplateLibrary
from llmesh.services.trainer import job_params, plan, registry, store
from llmesh.services.trainer.servicer import job_pb


def choose(req: pb.CreateJobRequest, train: int, held_out: int) -> plan.Plan:
    return plan.choose(job_params.requested(req), train, held_out)


# ---- choices -------------------------------------------------------------------------
def test_a_small_dataset_is_memorised_on_every_row_without_a_split() -> None:
    p = choose(pb.CreateJobRequest(adapter_name="faq"), 18, 2)  # the bundled FAQ, uploaded with 10% held out
    assert p.mode == plan.MEMORISE and p.train_examples == 20 and p.held_out_examples == 0
    per_epoch = -(-20 // plan.MEMORISE_BATCH)
    assert p.steps == max(plan.MEMORISE_MIN_STEPS, plan.MEMORISE_MIN_EPOCHS * per_epoch) == 150
    assert (p.learning_rate, p.rank, p.batch_size) == (plan.MEMORISE_LR, plan.RANK, plan.MEMORISE_BATCH)
    assert p.patience == 0 and p.eval_every_steps == 0 and p.pass_exact_match == plan.PASS_EXACT_MATCH
    assert "20 rows < 50" in p.reason


def test_memorising_takes_three_epochs_when_they_are_more_steps() -> None:
    p = choose(pb.CreateJobRequest(adapter_name="faq", mode=pb.TRAINING_MODE_MEMORISE, batch_size=1), 400, 0)
    assert p.steps == 3 * 400 and p.epochs == 3


def test_a_large_dataset_generalises_with_a_held_out_split_and_early_stopping() -> None:
    p = choose(pb.CreateJobRequest(adapter_name="qa"), 90, 10)
    assert p.mode == plan.GENERALISE and (p.train_examples, p.held_out_examples) == (90, 10)
    per_epoch = -(-90 // plan.GENERALISE_BATCH)
    assert p.steps == plan.GENERALISE_EPOCHS * per_epoch and p.epochs == plan.GENERALISE_EPOCHS
    assert p.patience == plan.PATIENCE and 0 < p.eval_every_steps <= per_epoch
    assert p.learning_rate == plan.GENERALISE_LR and p.pass_exact_match == 0
    assert "100 rows >= 50" in p.reason


def test_the_threshold_is_fifty_rows() -> None:
    assert choose(pb.CreateJobRequest(adapter_name="x"), 44, 5).mode == plan.MEMORISE
    assert choose(pb.CreateJobRequest(adapter_name="x"), 45, 5).mode == plan.GENERALISE


def test_explicit_values_win() -> None:
    req = pb.CreateJobRequest(
        adapter_name="faq",
        epochs=2,
        learning_rate=3e-3,
        batch_size=2,
        lora=pb.LoraConfig(rank=4, alpha=4),
        max_length=128,
    )
    p = choose(req, 18, 2)
    assert (p.epochs, p.steps, p.batch_size, p.rank, p.alpha, p.max_length) == (2, 20, 2, 4, 4.0, 128)
    assert p.learning_rate == pytest.approx(3e-3)
    assert choose(pb.CreateJobRequest(adapter_name="faq", max_steps=7), 18, 2).steps == 7
    forced = choose(pb.CreateJobRequest(adapter_name="faq", mode=pb.TRAINING_MODE_GENERALISE), 18, 2)
    assert forced.mode == plan.GENERALISE and forced.held_out_examples == 2 and "as requested" in forced.reason
    big = choose(pb.CreateJobRequest(adapter_name="qa", mode=pb.TRAINING_MODE_MEMORISE), 90, 10)
    assert big.mode == plan.MEMORISE and big.train_examples == 100


def test_generalising_without_held_out_rows_memorises() -> None:
    p = choose(pb.CreateJobRequest(adapter_name="x", mode=pb.TRAINING_MODE_GENERALISE), 1, 0)
    assert p.mode == plan.MEMORISE and "no held-out rows" in p.reason


def test_an_unknown_mode_names_the_field() -> None:
    with pytest.raises(InvalidArgument) as info:
        job_params.precheck(pb.CreateJobRequest(adapter_name="x", mode=cast(Any, 9)))
    assert info.value.field == "mode"


def test_the_plan_is_in_the_job_and_its_first_event(tmp_path: Path) -> None:
    db = store.open_database(tmp_path / "trainer.db")
    db.open_sync()
    try:
        req = pb.CreateJobRequest(dataset_id="d1", adapter_name="faq")
        chosen = choose(req, 18, 2)
        params = job_params.check(job_params.params_of(req, chosen))

        def create(c: Any) -> Any:
            store.insert_dataset(
                c, "d1", name="faq.json", fmt="alpaca_json", train_examples=18, eval_examples=2, duplicates=0,
                sha256="x", created_by="t/a",
            )  # fmt: skip
            return store.create_job(c, "job_1", "d1", params, "t/a")

        row = db.call_sync(create)
        job = job_pb(row)
        assert job.plan.mode == pb.TRAINING_MODE_MEMORISE and job.plan.steps == chosen.steps
        assert job.plan.held_out_examples == 0 and job.plan.train_examples == 20 and job.plan.rank == 16
        assert job.plan.reason == chosen.reason and job.plan.pass_exact_match == pytest.approx(0.9)
        events, _ = db.call_sync(lambda c: store.events_after(c, "job_1", 0))
        assert events[0]["kind"] == "queued" and events[0]["message"].startswith("memorise: ")
    finally:
        db.close_sync()


# ---- prompt format: training ----------------------------------------------------------
class Tok:
    """A tokenizer double with a chat template rendered by ``render`` (characters as ids,
    special tokens as one id each)."""

    SPECIAL = {"<|im_end|>": 2, "<|eot_id|>": 9, "</s>": 3}

    def __init__(self, render: Any, eos: int = 3) -> None:
        self.chat_template = "t" if render else None
        self._render = render
        self.eos_token_id = eos
        self.all_special_ids = sorted(self.SPECIAL.values())
        self.added_tokens_decoder: dict[int, Any] = {}

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = False, **_: Any) -> str:
        return str(self._render(messages))

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        ids, i = [], 0
        while i < len(text):
            tok = next((s for s in self.SPECIAL if text.startswith(s, i)), None)
            ids.append(self.SPECIAL[tok] if tok else 1000 + ord(text[i]))
            i += len(tok) if tok else 1
        return {"input_ids": ids}

    def decode(self, ids: list[int]) -> str:
        names = {v: k for k, v in self.SPECIAL.items()}
        return "".join(names.get(i, chr(i - 1000) if i >= 1000 else "") for i in ids)


def chatml(ms: list[dict[str, str]]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in ms)


def llama3(ms: list[dict[str, str]]) -> str:
    return "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in ms)


def test_the_end_of_turn_token_is_found_by_rendering_the_template() -> None:
    from llmesh.services.trainer.encoding import end_of_turn_id, prompt_format, prompt_text, target_ids

    qa = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ab"}]
    assert end_of_turn_id(Tok(chatml, eos=3)) == 2  # <|im_end|>, not eos
    assert end_of_turn_id(Tok(llama3, eos=3)) == 9  # <|eot_id|>
    assert target_ids(Tok(llama3, eos=3), qa) == [1000 + ord("a"), 1000 + ord("b"), 9]
    plain = Tok(lambda ms: "".join(f"{m['role']}: {m['content']}\n" for m in ms), eos=3)
    assert end_of_turn_id(plain) == 3  # the template writes no special token: eos
    raw = Tok(None, eos=3)
    assert prompt_format(raw) == "raw" and prompt_format(Tok(chatml)) == "chat"
    assert end_of_turn_id(raw) == 3 and prompt_text(raw, qa) == "q"


def test_the_real_models_end_their_turn_with_im_end() -> None:
    from transformers import AutoTokenizer

    from llmesh.services.trainer.encoding import end_of_turn_id

    root = Path(__file__).resolve().parents[2] / "var" / "models"
    found = [
        p for p in (root / "tiny-qwen2", root / "smollm2-135m-instruct") if (p / "tokenizer_config.json").is_file()
    ]
    if not found:
        pytest.skip("no model folder under var/models (llmesh models init makes them)")
    for folder in found:
        tok = AutoTokenizer.from_pretrained(folder)
        assert tok.convert_ids_to_tokens(end_of_turn_id(tok)) == "<|im_end|>", folder


# ---- prompt format: registry → serving ------------------------------------------------
def publish(db: Any, adapters: Path, tmp: Path, fmt: str) -> int:
    staged = tmp / f"staged-{fmt}"
    staged.mkdir()
    (staged / "adapter_config.json").write_text("{}")
    return int(
        db.call_sync(
            lambda c: registry.register(
                c, adapters, staged, name="faq", job_id="job_1", base_model="/m", base_sha="s", dataset_id="d1",
                hyperparameters={}, base_eval={}, tuned_eval={}, min_improvement=0.0, created_by="t/a",
                prompt_format=fmt,
            )
        )
    )  # fmt: skip


class Context:
    def __init__(self, token: str) -> None:
        self._md = ((IDENTITY_KEY, token),)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._md


def test_an_adapter_recorded_raw_gets_a_raw_prompt(tmp_path: Path) -> None:
    db = store.open_database(tmp_path / "trainer.db")
    db.open_sync()
    adapters = tmp_path / "adapters"
    try:
        assert publish(db, adapters, tmp_path, "chat") == 1 and publish(db, adapters, tmp_path, "raw") == 2
    finally:
        db.close_sync()
    announced = Announced(adapters)
    assert json.loads((adapters / "registry.json").read_text())["adapters"]["faq"]["prompt_formats"] == {"2": "raw"}
    assert [announced.prompt_format(f"faq@v{v}") for v in (1, 2)] == ["chat", "raw"]
    assert announced.prompt_format("test-lora") == "chat"  # a plain folder the registry does not know

    identity = InternalIdentity(os.urandom(32))
    servicer = InferenceServicer(
        load_config(env={}).inference, cast(Any, None), cast(Any, None), TemplateLibrary.load(), identity, announced
    )
    context = cast(Any, Context(identity.mint(Principal("alice", "acme", frozenset({"inference:*"})))))

    def raw_of(adapter: str, raw: bool = False) -> bool:
        req = ipb.GenerateRequest(prompt="What is the VPN?", adapter=adapter, raw=raw)
        return servicer._generation_input(req, context).raw

    assert raw_of("faq@v2") and raw_of("faq") is True  # no alias: the newest, v2, raw
    assert raw_of("faq@v1") is False and raw_of("") is False
    assert raw_of("faq@v1", raw=True) and raw_of("", raw=True)  # the request's raw still wins
