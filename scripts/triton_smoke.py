#!/usr/bin/env python
"""End-to-end smoke test of the ``llm`` Triton model on a real tritonserver (CPU).

Builds the demo models into a temporary LLMESH_HOME, writes a random LoRA adapter
(``adapters/demo-lora``), starts tritonserver (cwd = the temp home), and checks through
tritonclient (sync stream API and grpc.aio): stream == non-stream under a seed, greedy,
batching of concurrent requests, mixed adapter/base batches, NOT_FOUND / INVALID_ARGUMENT
errors, cancellation and Chinese streaming. Prints a short report; always kills the server.

Usage: python scripts/triton_smoke.py [--keep]
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llmesh import tritonserver  # noqa: E402
from llmesh.models import init_models  # noqa: E402

MODEL = "llm"
RESULTS: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    RESULTS.append((name, ok, detail))
    print(f"[{'PASS' if ok else 'FAIL'}] {name}{(': ' + detail) if detail else ''}", flush=True)


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def make_adapter(llm: pathlib.Path, dest: pathlib.Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(99)
    base = AutoModelForCausalLM.from_pretrained(llm)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    model.save_pretrained(dest)


# ------------------------------------------------------------------ client helpers


def build_inputs(grpcclient: Any, params: dict[str, Any]) -> list[Any]:
    kinds = {
        "prompt": ("BYTES", np.object_),
        "messages_json": ("BYTES", np.object_),
        "stop_json": ("BYTES", np.object_),
        "adapter": ("BYTES", np.object_),
        "max_tokens": ("INT32", np.int32),
        "top_k": ("INT32", np.int32),
        "temperature": ("FP32", np.float32),
        "top_p": ("FP32", np.float32),
        "repetition_penalty": ("FP32", np.float32),
        "seed": ("INT64", np.int64),
        "stream": ("BOOL", np.bool_),
    }
    inputs = []
    for name, value in params.items():
        dtype, np_dtype = kinds[name]
        if np_dtype is np.object_:
            value = value.encode("utf-8") if isinstance(value, str) else value
        arr = np.array([[value]], dtype=np_dtype)
        inp = grpcclient.InferInput(name, [1, 1], dtype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


class Stream:
    """One sync gRPC stream; requests on it are told apart by request id."""

    def __init__(self, url: str) -> None:
        import tritonclient.grpc as grpcclient

        self.grpcclient = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self.q: queue.Queue[tuple[Any, Any]] = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.q.put((result, error)))

    def send(self, rid: str, params: dict[str, Any]) -> None:
        self.client.async_stream_infer(
            MODEL, build_inputs(self.grpcclient, params), request_id=rid,
            enable_empty_final_response=True,
        )

    def collect(self, n: int, timeout: float = 120.0, on_delta: Any = None) -> dict[str, dict[str, Any]]:
        """Wait for n FINAL responses; return {rid: {text, chunks, finish, counts, error}}."""
        out: dict[str, dict[str, Any]] = {}
        done = 0
        deadline = time.time() + timeout
        while done < n:
            result, error = self.q.get(timeout=max(0.1, deadline - time.time()))
            if error is not None:  # stream errors carry no request id
                out.setdefault(f"error{len(out)}", {"error": error})
                done += 1
                continue
            resp = result.get_response()
            rid = resp.id
            rec = out.setdefault(rid, {"text": "", "chunks": [], "finish": None, "error": None})
            if result.as_numpy("text") is not None:
                delta = result.as_numpy("text").reshape(-1)[0].decode("utf-8")
                rec["text"] += delta
                if delta:
                    rec["chunks"].append(delta)
                rec["finish"] = result.as_numpy("finish_reason").reshape(-1)[0].decode() or rec["finish"]
                rec["prompt_tokens"] = int(result.as_numpy("prompt_tokens").reshape(-1)[0])
                rec["completion_tokens"] = int(result.as_numpy("completion_tokens").reshape(-1)[0])
                if on_delta:
                    on_delta(rid, delta)
            if resp.parameters["triton_final_response"].bool_param:
                done += 1
        return out

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def one(url: str, params: dict[str, Any]) -> dict[str, Any]:
    s = Stream(url)
    try:
        s.send("r", params)
        res = s.collect(1)
        return next(iter(res.values()))
    finally:
        s.close()


# ------------------------------------------------------------------ main


def main() -> int:
    keep = "--keep" in sys.argv
    home = pathlib.Path(tempfile.mkdtemp(prefix="llmesh-smoke-"))
    proc: subprocess.Popen[bytes] | None = None
    log_path = home / "tritonserver.log"
    try:
        t0 = time.perf_counter()
        paths = init_models(home)
        print(f"demo models built in {time.perf_counter() - t0:.2f}s under {home}")
        make_adapter(paths["llm"], home / "adapters" / "demo-lora")

        repo = home / "model_repository"
        shutil.copytree(ROOT / "triton_models" / "llm", repo / "llm")
        backends = tritonserver.prepare_backends(home / "backends")
        grpc_port, http_port, metrics_port = free_ports(3)
        argv, env = tritonserver.server_command(
            repo=repo, backends=backends, grpc_port=grpc_port, http_port=http_port,
            metrics_port=metrics_port, models=[MODEL],
            env_extra={"LLMESH_LLM_PATH": str(paths["llm"]), "LLMESH_HOME": str(home)},
        )
        t_start = time.perf_counter()
        log = open(log_path, "wb")
        proc = subprocess.Popen(argv, env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        import tritonclient.grpc as grpcclient

        url = f"127.0.0.1:{grpc_port}"
        client = grpcclient.InferenceServerClient(url)
        ready = False
        for _ in range(600):
            if proc.poll() is not None:
                break
            try:
                if client.is_model_ready(MODEL):
                    ready = True
                    break
            except Exception:
                pass
            time.sleep(0.1)
        check("server + model ready", ready, f"{time.perf_counter() - t_start:.2f}s after start")
        if not ready:
            print(log_path.read_text(errors="replace")[-4000:])
            return 1
        m = re.search(r"llm: loaded .* in ([0-9.]+)s", log_path.read_text(errors="replace"))
        print(f"model initialize() time (from log): {m.group(1) if m else '?'}s")

        base = {"prompt": "How do I reset my password?", "max_tokens": 24}

        # 1. stream == non-stream, seeded sampling
        a = one(url, {**base, "temperature": 0.8, "seed": 7, "stream": False})
        b = one(url, {**base, "temperature": 0.8, "seed": 7, "stream": True})
        check("seed 7 T=0.8: stream == non-stream", a["text"] == b["text"] and a["completion_tokens"] == b["completion_tokens"],
              f"{a['text']!r} ({a['completion_tokens']} tok, {a['finish']}) stream chunks={len(b['chunks'])}")
        c = one(url, {**base, "temperature": 0.8, "seed": 8})
        check("different seed differs", c["text"] != a["text"])
        g1 = one(url, {**base, "temperature": 0.0})
        g2 = one(url, {**base, "temperature": 0.0, "stream": True, "seed": 123})
        check("greedy: equal across calls/stream", g1["text"] == g2["text"], repr(g1["text"]))

        # 2. 8 concurrent requests batch; results equal to solo
        s = Stream(url)
        reqs = {f"c{i}": {**base, "temperature": 0.8, "seed": 100 + i, "max_tokens": 16 + i} for i in range(8)}
        mark = len(log_path.read_text(errors="replace"))
        s.send("blocker", {**base, "max_tokens": 400, "temperature": 0.0})
        time.sleep(0.05)
        for rid, p in reqs.items():
            s.send(rid, p)
        batched = s.collect(9)
        batched.pop("blocker", None)
        s.close()
        time.sleep(0.2)
        batches = [int(x) for x in re.findall(r"execute batch=(\d+)", log_path.read_text(errors="replace")[mark:])]
        check("8 concurrent requests were batched", max(batches or [0]) >= 4, f"requests per execute: {batches}")
        solo_ok = all(one(url, p)["text"] == batched[rid]["text"] for rid, p in reqs.items())
        check("batched results == solo results (seeded)", solo_ok)

        # 3. mixed adapter/base batch
        # Triton's dynamic batcher only puts requests with the SAME set of input names into
        # one execute(): clients must always send the full set (adapter "" = base model).
        full = {**base, "seed": 0, "stream": False, "adapter": ""}
        mixed = {
            "m0": {**full, "temperature": 0.0, "adapter": "demo-lora"},
            "m1": {**full, "temperature": 0.0},
            "m2": {**full, "temperature": 0.7, "seed": 5, "adapter": "demo-lora", "stream": True},
            "m3": {**full, "temperature": 0.7, "seed": 5},
        }
        s = Stream(url)
        mark = len(log_path.read_text(errors="replace"))
        # a long request first keeps the single instance busy so the next four queue up
        # and reach execute() together
        s.send("blocker", {**full, "max_tokens": 400, "temperature": 0.0})  # greedy: loops, no eos
        time.sleep(0.05)
        for rid, p in mixed.items():
            s.send(rid, p)
        got = s.collect(5)
        s.close()
        batches = re.findall(r"execute batch=(\d+).*adapters=(\[.*\])", log_path.read_text(errors="replace")[mark:])
        solo = {rid: one(url, p)["text"] for rid, p in mixed.items()}
        check("mixed adapter/base batch == solo", all(solo[r] == got[r]["text"] for r in mixed)
              and any(int(b) >= 2 and "demo-lora" in a and "<base>" in a for b, a in batches),
              f"executes: {batches}")
        check("adapter output differs from base", got["m0"]["text"] != got["m1"]["text"],
              f"lora={got['m0']['text'][:30]!r} base={got['m1']['text'][:30]!r}")

        # 4. errors (sync stream API)
        e = one(url, {**base, "adapter": "nope"})
        err = e.get("error")
        check("unknown adapter -> NOT_FOUND", err is not None and "NOT_FOUND: adapter 'nope' not found" in str(err),
              f"{type(err).__name__}: status={getattr(err, 'status', lambda: None)()} msg={getattr(err, 'message', lambda: err)()!r}")
        e2 = one(url, {"max_tokens": 4})
        err2 = e2.get("error")
        check("no prompt -> INVALID_ARGUMENT", err2 is not None and "INVALID_ARGUMENT: prompt" in str(err2),
              f"{type(err2).__name__}: msg={getattr(err2, 'message', lambda: err2)()!r}")
        e3 = one(url, {**base, "max_tokens": 2000})
        check("too long -> INVALID_ARGUMENT", "INVALID_ARGUMENT: max_tokens" in str(e3.get("error")), str(e3.get("error")))
        e4 = one(url, {**base, "adapter": "../etc"})
        check("bad adapter name -> INVALID_ARGUMENT", "INVALID_ARGUMENT: adapter" in str(e4.get("error")), str(e4.get("error")))
        e5 = one(url, {"messages_json": "[not json"})
        check("bad messages_json -> INVALID_ARGUMENT", "INVALID_ARGUMENT: messages_json" in str(e5.get("error")), str(e5.get("error")))
        # a bad request in a batch does not hurt the others
        s = Stream(url)
        s.send("ok1", {**base, "temperature": 0.0})
        s.send("bad", {**base, "adapter": "missing-one"})
        s.send("ok2", {**base, "temperature": 0.0, "adapter": "demo-lora"})
        mixed_err = s.collect(3)
        s.close()
        oks = [v for k, v in mixed_err.items() if k.startswith("ok")]
        check("error row does not break batch", len(oks) == 2 and oks[0]["text"] == g1["text"]
              and any(k.startswith("error") for k in mixed_err))

        # 5. aio API errors + chat messages
        async def aio_checks() -> list[str]:
            import tritonclient.grpc.aio as aioclient

            out = []
            cl = aioclient.InferenceServerClient(url)

            async def gen(params: dict[str, Any]):
                yield {"model_name": MODEL, "inputs": build_inputs(aioclient, params), "request_id": "x",
                       "enable_empty_final_response": True}

            for params in ({**base, "adapter": "nope"}, {"prompt": "a", "messages_json": "[]"},
                           {"messages_json": json.dumps([{"role": "user", "content": "如何重置密码？"}]), "max_tokens": 8}):
                texts = []
                try:
                    async for result, error in cl.stream_infer(gen(params)):
                        if error is not None:
                            out.append(f"{type(error).__name__}: {error.message()!r}")
                            break
                        t = result.as_numpy("text")
                        if t is not None:
                            texts.append(t.reshape(-1)[0].decode())
                        if result.get_response().parameters["triton_final_response"].bool_param:
                            out.append(f"ok text={''.join(texts)!r} finish={result.as_numpy('finish_reason')}")
                            break
                except Exception as exc:
                    out.append(f"raised {type(exc).__name__}: {exc}")
            await cl.close()
            return out

        aio = asyncio.run(aio_checks())
        check("aio: NOT_FOUND", "NOT_FOUND: adapter 'nope' not found" in aio[0], aio[0])
        check("aio: INVALID_ARGUMENT", "INVALID_ARGUMENT" in aio[1], aio[1])
        check("aio: chat messages", aio[2].startswith("ok"), aio[2])

        # 6. cancellation mid-stream
        s = Stream(url)
        mark = len(log_path.read_text(errors="replace"))
        s.send("long", {**base, "max_tokens": 900, "stream": True, "temperature": 1.0, "seed": 3,
                        "stop_json": "[]"})
        got_chunks = 0
        t_c = time.time()
        while got_chunks < 5 and time.time() - t_c < 30:
            result, error = s.q.get(timeout=30)
            if result is not None and result.as_numpy("text") is not None:
                got_chunks += 1
            if result is not None and result.get_response().parameters["triton_final_response"].bool_param:
                break
        s.close(cancel=True)
        t_cancel = time.time()
        line = None
        while time.time() - t_cancel < 20:
            lines = re.findall(r"execute batch=.*", log_path.read_text(errors="replace")[mark:])
            if lines:
                line = lines[-1]
                break
            time.sleep(0.05)
        m = re.search(r"tokens=(\d+)", line or "")
        check("cancel stops generation", line is not None and "cancelled" in line and int(m.group(1)) < 900,
              f"{line} (seen {time.time() - t_cancel:.2f}s after cancel)")
        # model still healthy afterwards
        check("healthy after cancel", one(url, {**base, "temperature": 0.0})["text"] == g1["text"])

        # 7. chinese prompt streams valid UTF-8 (each chunk decodes; no replacement chars)
        zh = one(url, {"messages_json": json.dumps([{"role": "user", "content": "如何重置密码？"}]),
                       "max_tokens": 64, "stream": True, "temperature": 1.0, "seed": 11})
        zh_ns = one(url, {"messages_json": json.dumps([{"role": "user", "content": "如何重置密码？"}]),
                          "max_tokens": 64, "temperature": 1.0, "seed": 11})
        check("chinese stream: valid UTF-8, equal to non-stream",
              zh["text"] == zh_ns["text"] and "".join(zh["chunks"]) == zh["text"],
              f"chunks={len(zh['chunks'])} text={zh['text'][:40]!r}")
        # stop strings excluded from output
        full = one(url, {**base, "temperature": 0.0, "max_tokens": 24})["text"]
        if len(full) > 6:
            stop = full[3:6]
            st = one(url, {**base, "temperature": 0.0, "max_tokens": 24, "stop_json": json.dumps([stop]), "stream": True})
            check("stop string cuts + excluded", st["text"] == full[: full.find(stop)] and st["finish"] == "stop",
                  f"stop={stop!r} -> {st['text']!r} {st['finish']}")

        # 8. throughput batch 1 vs 8
        n_tok = 200
        t1 = time.perf_counter()
        r1 = one(url, {**base, "max_tokens": n_tok, "temperature": 1.0, "seed": 1, "stop_json": "[]"})
        dt1 = time.perf_counter() - t1
        s = Stream(url)
        t8 = time.perf_counter()
        for i in range(8):
            s.send(f"t{i}", {**base, "max_tokens": n_tok, "temperature": 1.0, "seed": 1 + i})
        r8 = s.collect(8)
        dt8 = time.perf_counter() - t8
        s.close()
        tok1 = r1["completion_tokens"]
        tok8 = sum(v["completion_tokens"] for v in r8.values())
        print(f"throughput: batch1 {tok1} tok in {dt1:.2f}s = {tok1 / dt1:.0f} tok/s; "
              f"batch8 {tok8} tok in {dt8:.2f}s = {tok8 / dt8:.0f} tok/s")
        print("executes:", re.findall(r"execute batch=\d+ decoded=\d+ steps=\d+ tokens=\d+ time=[0-9.]+ms",
                                      log_path.read_text(errors="replace"))[-3:])
    finally:
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=15)
            except Exception:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        failed = [r for r in RESULTS if not r[1]]
        print(f"\nSUMMARY: {len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed; server log {log_path}")
        if not keep and not failed:
            shutil.rmtree(home, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
