"""The real default LM, SmolLM2-135M-Instruct converted from its wheel's GGUF, answers a
factual question: the converted folder is reloaded by the real tritonserver (started
exactly as the mesh starts it, alone, on free loopback ports) and asked through the
inference service's Triton client. Greedy decoding, so the answer is deterministic.

The folder converted by set-up (`var/models/smollm2-135m-instruct`) is reused when it is
complete; otherwise the wheel's file is converted into a temporary folder (~1 min)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmesh.config import load_config
from llmesh.demo.catalog import DEFAULT_LM
from llmesh.demo.gguf_import import SMOLLM2, wheel_gguf
from llmesh.demo.models import convert_llm, converted_recipe, is_complete
from tests.support.sandbox import write_config

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
SECOND = "What is the capital of Germany?"
MAX_TOKENS = 24
REPO_COPY = Path(__file__).resolve().parents[2] / "var" / "models" / DEFAULT_LM


@pytest.fixture(scope="module")
def real_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if is_complete(REPO_COPY, "llm"):
        return REPO_COPY
    return convert_llm(wheel_gguf(SMOLLM2), tmp_path_factory.mktemp("real-lm") / DEFAULT_LM)


def test_the_folder_records_what_it_was_converted_from(real_lm: Path) -> None:
    import json

    recipe = json.loads((real_lm / ".llmesh-demo.json").read_text())["recipe"]
    assert recipe["source"]["name"] == SMOLLM2.filename and recipe["source"]["size"] > 90_000_000
    assert recipe["converter"] == converted_recipe({})["converter"]
    config = json.loads((real_lm / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config


@pytest.fixture(scope="module")
def triton(real_lm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """tritonserver serving the real LM as the `llm` model; yields its gRPC and metrics addresses."""
    from llmesh.launcher.processes import triton_spec

    home = tmp_path_factory.mktemp("real-home")
    cfg = load_config(write_config(home, {"triton": {"llm_path": str(real_lm)}}), env={})
    spec = triton_spec(cfg)
    log = (home / "tritonserver.log").open("wb")
    proc = subprocess.Popen(
        spec.argv, env=dict(spec.env), cwd=spec.cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        yield f"127.0.0.1:{cfg.triton.grpc_port}", f"http://127.0.0.1:{cfg.triton.metrics_port}/metrics"
    finally:
        proc.send_signal(signal.SIGTERM)  # the server unloads the model through its stub
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
        print((home / "tritonserver.log").read_text(errors="replace")[-2000:])


async def _answer(address: str, messages: list[dict[str, str]]) -> str:
    """The greedy answer to `messages`, waiting for the server to load the model first."""
    from llmesh.runtime.errors import Unavailable
    from llmesh.services.inference.llm_backend import GenerationInput, LlmBackend
    from llmesh.services.inference.sampling import Sampling

    backend = LlmBackend(address, "llm")
    try:
        deadline = time.monotonic() + 120  # server start + loading 541 MB of weights
        while True:
            try:
                await backend.ready()
                break
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        inp = GenerationInput(sampling=Sampling(temperature=0.0, max_tokens=MAX_TOKENS), messages=messages)
        started = time.monotonic()
        chunk = await backend.complete(inp, timeout=60)
        print(f"{chunk.completion_tokens} tokens in {time.monotonic() - started:.2f} s: {chunk.text!r}")
        assert chunk.finish_reason in ("stop", "length") and chunk.completion_tokens > 0
        return chunk.text
    finally:
        await backend.close()


def _reused_tokens(metrics_url: str) -> float:
    import urllib.request

    body = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith("llmesh_llm_prefix_reused")
    )


def test_triton_serves_the_real_model_and_it_knows_the_capital_of_france(triton: tuple[str, str]) -> None:
    text = asyncio.run(asyncio.wait_for(_answer(triton[0], QUESTION), timeout=180))
    assert "Paris" in text, text


def test_the_next_chat_turn_reuses_the_previous_one(triton: tuple[str, str], real_lm: Path) -> None:
    """Turn 2 resends turn 1 and its answer: the prefix cache serves their keys/values, and the
    answer is still right."""
    from transformers import AutoTokenizer

    address, metrics = triton
    first = asyncio.run(asyncio.wait_for(_answer(address, QUESTION), timeout=180))
    before = _reused_tokens(metrics)
    turn2 = [*QUESTION, {"role": "assistant", "content": first}, {"role": "user", "content": SECOND}]
    text = asyncio.run(asyncio.wait_for(_answer(address, turn2), timeout=180))
    assert "Berlin" in text, text
    tokenizer = AutoTokenizer.from_pretrained(real_lm)
    prompt1 = tokenizer(tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False))
    turn1 = len(prompt1["input_ids"])
    assert _reused_tokens(metrics) - before > turn1  # turn 1's prompt and (some of) its answer
