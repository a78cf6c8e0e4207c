"""Demo model build: determinism, offline reload, tokenizer and chat template.

Nothing here needs tritonserver; the whole module runs in a few seconds on CPU.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import pathlib
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmesh.demo.models import (  # noqa: E402
    build_llm,
    faq_pairs,
    init_models,
    is_complete,
)
from tests.support.triton_llm import FakeRequest, load_llm, load_module, model_folder, results, run  # noqa: E402


def _digests(folder: pathlib.Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    h = tmp_path_factory.mktemp("llmesh-home")
    init_models(h)
    return h


def test_faq_has_twenty_pairs() -> None:
    pairs = faq_pairs()
    assert len(pairs) == 20
    assert any(any("\u4e00" <= ch <= "\u9fff" for ch in p["question"]) for p in pairs)


def test_build_is_complete_and_skipped(home: pathlib.Path) -> None:
    paths = init_models(home)
    assert paths == {"llm": home / "models" / "tiny-qwen2", "clip": home / "models" / "tiny-clip"}
    assert is_complete(paths["llm"], "llm") and is_complete(paths["clip"], "clip")
    mtime = (paths["llm"] / "model.safetensors").stat().st_mtime_ns
    init_models(home)  # complete: nothing rebuilt
    assert (paths["llm"] / "model.safetensors").stat().st_mtime_ns == mtime
    (paths["llm"] / "model.safetensors").unlink()
    assert not is_complete(paths["llm"], "llm")
    init_models(home)  # incomplete: rebuilt
    assert is_complete(paths["llm"], "llm")


def test_build_twice_is_byte_identical(home: pathlib.Path, tmp_path: pathlib.Path) -> None:
    other = init_models(tmp_path, force=True)
    for kind in ("llm", "clip"):
        assert _digests(other[kind]) == _digests(home / "models" / other[kind].name), kind


def test_llm_reload_identical_ids_and_logits(home: pathlib.Path, tmp_path: pathlib.Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = home / "models" / "tiny-qwen2"
    tok = AutoTokenizer.from_pretrained(path)
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))  # the trained pipeline as saved
    assert 2000 <= len(tok) <= 4096
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    texts = [p["question"] for p in faq_pairs()] + [p["answer"] for p in faq_pairs()]
    texts += ["Hello   world\n\n  it's 12345 你好！ 🙂"]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids == raw.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == text

    chat = tok.apply_chat_template(
        [{"role": "user", "content": "如何重置密码？"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|im_start|>user\n如何重置密码？<|im_end|>\n<|im_start|>assistant\n"

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.config.max_position_embeddings == 1024
    assert not model.config.tie_word_embeddings
    n = sum(p.numel() for p in model.parameters())
    assert 300_000 <= n <= 1_000_000
    assert 0.15 < float(model.lm_head.weight.detach().std()) < 0.25

    # the in-memory model from a fresh build equals the reloaded one
    fresh = build_llm(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(fresh).eval()
    ids = torch.tensor([tok(texts[0])["input_ids"]])
    with torch.inference_mode():
        a = model(ids).logits
        b = again(ids).logits
    assert torch.equal(a, b)


def test_clip_reload_offline(home: pathlib.Path) -> None:
    from PIL import Image
    from transformers import AutoProcessor, CLIPModel

    path = home / "models" / "tiny-clip"
    proc = AutoProcessor.from_pretrained(path)
    model = CLIPModel.from_pretrained(path).eval()
    img = Image.new("RGB", (40, 30), (200, 10, 10))
    inputs = proc(text=["reset password", "重置密码"], images=[img], return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model(**inputs)
    assert out.text_embeds.shape == (2, 64)
    assert out.image_embeds.shape == (1, 64)


# --------------------------------------------------------------------------- tritonserver.py


def test_tritonserver_locate_prepare_and_command(tmp_path: pathlib.Path) -> None:
    import os
    import sys

    from llmesh.launcher import tritonserver

    try:
        inst = tritonserver.locate()
    except tritonserver.TritonNotInstalled:
        pytest.skip("nvidia-pytriton not installed")
    assert inst.binary.is_file() and inst.stub.is_file()
    backends = tritonserver.prepare_backends(tmp_path / "backends")
    names = sorted(p.name for p in (backends / "python").iterdir())
    assert names == ["libtriton_python.so", "triton_python_backend_stub", "triton_python_backend_utils.py"]
    assert os.access(backends / "python" / "triton_python_backend_stub", os.X_OK)
    assert tritonserver.prepare_backends(tmp_path / "backends") == backends  # idempotent
    argv, env = tritonserver.server_command(
        repo=tmp_path / "repo",
        backends=backends,
        grpc_port=1,
        http_port=2,
        metrics_port=3,
        models=["llm", "clip"],
        env_extra={"LLMESH_HOME": "/h"},
    )
    assert argv[0] == str(inst.binary)
    for flag in (
        "--model-control-mode=explicit",
        "--load-model=llm",
        "--load-model=clip",
        "--disable-auto-complete-config",
        "--grpc-address=127.0.0.1",
        "--http-address=127.0.0.1",
        "--metrics-address=127.0.0.1",
        "--allow-gpu-metrics=false",
        "--grpc-port=1",
        "--backend-config=python,shm-default-byte-size=16777216",
        "--exit-timeout-secs=10",
        "--log-verbose=0",
    ):
        assert flag in argv, flag
    assert env["LLMESH_HOME"] == "/h"
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0] == str(inst.libs_dir)


# --------------------------------------------------------------------------- model.py (no server)


@pytest.fixture(scope="module")
def llm_model(home: pathlib.Path):
    import os

    os.environ["LLMESH_LLM_PATH"] = str(home / "models" / "tiny-qwen2")
    os.environ["LLMESH_HOME"] = str(home)
    params = {
        "model_path": "${LLMESH_LLM_PATH}",
        "adapter_dir": "${LLMESH_HOME}/adapters",
        "adapter_cache_size": "8",
        "threads": "2",
    }
    _, m = load_llm(params)
    yield m
    m.finalize()


def test_model_folder_imports_its_modules_as_triton_does() -> None:
    folder = model_folder("llm")
    helpers = sorted(p.stem for p in folder.glob("*.py") if p.stem != "model")
    assert helpers and (folder / "model.py").is_file()
    elsewhere = [p for p in sys.path if p != str(folder)]
    for name in helpers:  # imported as top-level modules: no installed module may shadow one
        assert name.startswith("llm_"), name
        assert importlib.machinery.PathFinder.find_spec(name, elsewhere) is None, name
    mod = load_module("llm")
    assert mod.TritonPythonModel.__name__ == "TritonPythonModel"
    for name in helpers:
        assert sys.modules[name].__file__ == str(folder / f"{name}.py")


def test_model_batched_equals_solo_and_stream(llm_model) -> None:
    reqs = [
        {"prompt": "How do I reset my password?", "max_tokens": 20, "temperature": 0.8, "seed": 7},
        {"prompt": "如何重置密码？", "max_tokens": 12, "temperature": 0.0},
        {
            "messages_json": '[{"role":"user","content":"VPN 连不上怎么办？"}]',
            "max_tokens": 30,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 0.9,
            "repetition_penalty": 1.3,
            "seed": 3,
        },
    ]
    batched = run(llm_model, *reqs)
    for req, got in zip(reqs, batched, strict=True):
        solo = run(llm_model, req)[0]
        streamed = run(llm_model, {**req, "stream": True})[0]
        assert solo["text"] == got["text"] == streamed["text"]
        assert solo["completion_tokens"] == got["completion_tokens"]
        assert got["chunks"] == 1 and streamed["chunks"] >= 1


def test_model_errors_and_stop(llm_model) -> None:
    res = run(
        llm_model,
        {"max_tokens": 3},
        {"prompt": "x", "messages_json": "[]"},
        {"prompt": "x", "adapter": "../x"},
        {"prompt": "x", "adapter": "missing"},
        {"prompt": "x", "max_tokens": 0},
        {"prompt": "x", "max_tokens": 1024},
        {"prompt": "hello", "max_tokens": 5, "temperature": 0.0},
    )
    assert res[0] == {
        "code": "INVALID_ARGUMENT",
        "field": "prompt",
        "error": "exactly one of prompt or messages_json is required",
    }
    assert res[1]["code"] == "INVALID_ARGUMENT" and res[1]["field"] == "prompt"
    assert res[2] == {"code": "INVALID_ARGUMENT", "field": "adapter", "error": "invalid adapter name '../x'"}
    assert res[3] == {"code": "NOT_FOUND", "field": "adapter", "error": "adapter 'missing' not found"}
    assert res[4] == {"code": "INVALID_ARGUMENT", "field": "max_tokens", "error": "must be >= 1"}
    assert res[5]["code"] == "INVALID_ARGUMENT" and res[5]["field"] == "max_tokens"
    assert "exceeds the context of 1024" in str(res[5]["error"])
    for r in res[:6]:  # the message is the reason alone: no status tag for anyone to parse
        assert not str(r["error"]).startswith(("INVALID_ARGUMENT", "NOT_FOUND")), r
    assert res[6]["finish"] == "length" and res[6]["completion_tokens"] == 5

    full = run(llm_model, {"prompt": "hello", "max_tokens": 24, "temperature": 0.0})[0]["text"]
    stop = full[4:6]
    for stream in (False, True):
        got = run(
            llm_model,
            {"prompt": "hello", "max_tokens": 24, "temperature": 0.0, "stop_json": f'["{stop}"]', "stream": stream},
        )[0]
        assert got["text"] == full[: full.find(stop)] and got["finish"] == "stop"


def test_model_cancel(llm_model) -> None:
    got = run(llm_model, {"prompt": "hello", "max_tokens": 500, "stream": True}, cancel_after=3)[0]
    assert got["finish"] == "cancelled" and got["completion_tokens"] == 3


def _record_batch_sizes(model, monkeypatch) -> list[int]:
    """Rows per decode step, recorded from the decode thread."""
    sizes: list[int] = []
    step = model.engine.decode_step

    def recording(batch):
        sizes.append(len(batch.rows))
        return step(batch)

    monkeypatch.setattr(model.engine, "decode_step", recording)
    return sizes


def test_model_request_joins_running_batch(llm_model, monkeypatch) -> None:
    # A long seeded generation, and a short one submitted while the first is mid-way.
    for seed in range(40):
        long_req = {"prompt": "tell a long story", "max_tokens": 80, "temperature": 1.0, "seed": seed}
        long_solo = run(llm_model, long_req)[0]
        if long_solo["completion_tokens"] >= 60:
            break
    else:
        pytest.fail("no seed generated 60 tokens")
    short_req = {"prompt": "如何重置密码？", "max_tokens": 10, "temperature": 0.7, "seed": 5, "stream": True}
    short_solo = run(llm_model, short_req)[0]

    sizes = _record_batch_sizes(llm_model, monkeypatch)
    first = FakeRequest(long_req)
    llm_model.execute([first])
    import time

    deadline = time.monotonic() + 30
    while first.polls < 5 and time.monotonic() < deadline:  # one poll per generated token
        time.sleep(0.0005)
    assert not first.sender.done.is_set(), "the long request finished before the second arrived"
    second = FakeRequest(short_req)
    llm_model.execute([second])
    long_got, short_got = results([first, second])
    assert 2 in sizes, "the second request never decoded together with the first"
    for got, solo in ((long_got, long_solo), (short_got, short_solo)):
        assert got["text"] == solo["text"] and got["completion_tokens"] == solo["completion_tokens"]


def test_model_queue_overflow(llm_model, monkeypatch) -> None:
    # More requests than active slots: the rest wait in the queue and still match solo runs.
    sizes = _record_batch_sizes(llm_model, monkeypatch)
    reqs = [{"prompt": f"question {i}", "max_tokens": 6, "temperature": 0.0} for i in range(20)]
    together = run(llm_model, *reqs)
    assert max(sizes) == 16
    for req, got in zip(reqs[:3], together[:3], strict=True):
        assert got["text"] == run(llm_model, req)[0]["text"]


def test_model_sheds_load_beyond_the_queue_bound(llm_model, monkeypatch) -> None:
    monkeypatch.setattr(llm_model.engine, "max_queue", 2)
    reqs = [{"prompt": f"q {i}", "max_tokens": 4, "temperature": 0.0} for i in range(6)]
    got = run(llm_model, *reqs)  # all six arrive in one execute(): two fit the queue
    refused = [r for r in got if "error" in r]
    assert len(refused) == 4
    assert all(
        r == {"code": "RESOURCE_EXHAUSTED", "field": "", "error": "llm queue is full (2 waiting)"} for r in refused
    )
    assert all("text" in r for r in got[:2])


def test_model_finalize_fails_pending_requests(home: pathlib.Path) -> None:
    params = {"model_path": str(home / "models" / "tiny-qwen2"), "adapter_dir": str(home / "adapters")}
    _, m = load_llm(params, max_batch_size=1)
    reqs = [FakeRequest({"prompt": "hello", "max_tokens": 1000, "temperature": 1.0}) for _ in range(4)]
    m.execute(reqs)
    m.finalize()
    assert not m.engine.thread.is_alive()
    for r in reqs:
        assert r.sender.done.is_set()
    got = results(reqs)  # exactly one FINAL each
    errors = [r for r in got if "code" in r]
    shutting_down = {"code": "UNAVAILABLE", "field": "", "error": "llm model is shutting down"}
    assert errors and all(e == shutting_down for e in errors)
    late = FakeRequest({"prompt": "hello"})
    m.execute([late])  # after finalize: answered at once, not queued forever
    assert late.sender.done.is_set() and results([late]) == [shutting_down]


def test_model_survives_a_failing_step(llm_model, monkeypatch) -> None:
    step = llm_model.engine.decode_step
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return step(batch)

    monkeypatch.setattr(llm_model.engine, "decode_step", flaky)
    failed = run(llm_model, {"prompt": "hello", "max_tokens": 50, "temperature": 0.0})[0]
    assert failed == {"code": "INTERNAL", "field": "", "error": "boom"}
    assert llm_model.engine.thread.is_alive()
    monkeypatch.setattr(llm_model.engine, "decode_step", step)
    assert run(llm_model, {"prompt": "hello", "max_tokens": 5, "temperature": 0.0})[0]["completion_tokens"] == 5
