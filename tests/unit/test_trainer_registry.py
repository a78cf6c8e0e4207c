"""The adapter registry on a real SQLite file and adapter store: versions, atomic
publish, aliases with promote/rollback, delete rules, and what inference resolves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmesh.adapter_store import Announced
from llmesh.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from llmesh.runtime.sqlite import Database
from llmesh.services.trainer import registry
from llmesh.services.trainer.store import open_database

GOOD = {"loss": 1.0, "perplexity": 2.7, "rouge_l": 0.8, "exact_match": 0.5, "examples": 2}
BASE = {"loss": 3.0, "perplexity": 20.0, "rouge_l": 0.1, "exact_match": 0.0, "examples": 2}


@pytest.fixture
def env(tmp_path: Path):
    db = open_database(tmp_path / "trainer.db")
    db.open_sync()
    store = tmp_path / "adapters"
    yield db, store, tmp_path
    db.close_sync()


def publish(
    db: Database,
    store: Path,
    tmp: Path,
    name: str = "faq",
    tuned: dict[str, Any] = GOOD,
    min_improvement: float = 0.0,
    base_sha: str = "sha-a",
) -> int:
    staged = tmp / f"staged-{name}"
    staged.mkdir(exist_ok=True)
    (staged / "adapter_config.json").write_text("{}")
    return db.call_sync(
        lambda c: registry.register(
            c,
            store,
            staged,
            name=name,
            job_id="job_1",
            base_model="/m",
            base_sha=base_sha,
            dataset_id="d1",
            hyperparameters={"rank": "8"},
            base_eval=BASE,
            tuned_eval=tuned,
            min_improvement=min_improvement,
            created_by="acme/alice",
        )
    )


def test_versions_publish_atomically_and_are_announced(env) -> None:
    db, store, tmp = env
    assert publish(db, store, tmp) == 1 and publish(db, store, tmp) == 2
    assert (store / "faq@v1" / "adapter_config.json").is_file() and (store / "faq@v2").is_dir()
    doc = json.loads((store / "registry.json").read_text())
    assert doc["adapters"]["faq"] == {"versions": [1, 2], "aliases": {}}
    announced = Announced(store)
    assert announced.resolve("faq") == "faq@v2"  # no alias yet: the newest
    assert announced.resolve("faq@v1") == "faq@v1" and announced.resolve("test-lora") == "test-lora"


def test_promote_rollback_and_delete_rules(env) -> None:
    db, store, tmp = env
    publish(db, store, tmp)
    publish(db, store, tmp)
    announced = Announced(store)
    db.call_sync(lambda c: registry.promote(c, store, "faq@v1", "", "sha-a"))
    assert announced.resolve("faq") == "faq@v1" and announced.resolve("faq@live") == "faq@v1"
    db.call_sync(lambda c: registry.promote(c, store, "faq@v2", "live", "sha-a"))
    assert announced.resolve("faq") == "faq@v2"
    assert db.call_sync(lambda c: registry.rollback(c, store, "faq", "live")) == ("faq", 1)
    assert announced.resolve("faq@live") == "faq@v1"
    with pytest.raises(FailedPrecondition, match="no earlier version"):
        db.call_sync(lambda c: registry.rollback(c, store, "faq", "live"))
    with pytest.raises(FailedPrecondition, match="faq@live"):
        db.call_sync(lambda c: registry.delete(c, store, "faq@v1"))
    assert db.call_sync(lambda c: registry.delete(c, store, "faq@v2")) is True
    assert not (store / "faq@v2").exists() and json.loads((store / "registry.json").read_text())["adapters"]["faq"][
        "versions"
    ] == [1]
    assert db.call_sync(lambda c: registry.delete(c, store, "faq@v2")) is False
    with pytest.raises(NotFound):
        announced.resolve("faq@canary")


def test_promotion_checks_the_base_model_and_the_margin(env) -> None:
    db, store, tmp = env
    publish(db, store, tmp, name="other-base", base_sha="sha-b")
    with pytest.raises(FailedPrecondition, match="another base model"):
        db.call_sync(lambda c: registry.promote(c, store, "other-base@v1", "", "sha-a"))
    publish(db, store, tmp, name="weak", tuned={**GOOD, "rouge_l": 0.15}, min_improvement=0.2)
    with pytest.raises(FailedPrecondition, match="requires 0.200"):
        db.call_sync(lambda c: registry.promote(c, store, "weak@v1", "", "sha-a"))


@pytest.mark.parametrize("ref", ["", "Faq", "faq@", "faq@v", "faq@1bad", "../x", "faq@v1@v2"])
def test_bad_refs(ref: str) -> None:
    with pytest.raises(InvalidArgument):
        registry.parse_ref(ref)


def test_model_fingerprint_changes_with_the_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"a" * 10)
    first = registry.model_fingerprint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"b" * 10)
    assert registry.model_fingerprint(tmp_path) != first


def test_ab_split_is_sticky_per_caller_and_follows_the_weights(env) -> None:
    db, store, tmp = env
    publish(db, store, tmp)
    publish(db, store, tmp)
    db.call_sync(lambda c: registry.promote(c, store, "faq@v1", "", "sha-a"))
    db.call_sync(lambda c: registry.set_split(c, store, "faq", "live", [(1, 9.0), (2, 1.0)], "sha-a"))
    announced = Announced(store)
    picks = [announced.resolve("faq", caller=f"acme/user{i}") for i in range(2000)]
    assert all(announced.resolve("faq", caller=f"acme/user{i}") == picks[i] for i in range(50))  # sticky
    share = picks.count("faq@v2") / len(picks)
    assert 0.07 < share < 0.13  # 10 % by weight
    assert announced.resolve("faq@v1", caller="acme/user1") == "faq@v1"  # explicit versions bypass the split
    with pytest.raises(FailedPrecondition, match="split"):
        db.call_sync(lambda c: registry.delete(c, store, "faq@v2"))
    with pytest.raises(InvalidArgument):
        db.call_sync(lambda c: registry.set_split(c, store, "faq", "live", [(1, 0.0)], "sha-a"))
    with pytest.raises(NotFound):
        db.call_sync(lambda c: registry.set_split(c, store, "faq", "live", [(7, 1.0)], "sha-a"))
    db.call_sync(lambda c: registry.set_split(c, store, "faq", "live", [], "sha-a"))  # removed
    assert announced.resolve("faq", caller="acme/user1") == "faq@v1"
