"""Triton Python backend: batched, streaming causal-LM generation with per-request LoRA.

Self-contained on purpose: the Python backend stub ignores PYTHONPATH, so this file only
imports the standard library, numpy, torch, transformers and peft.

Contract (see config.pbtxt; every tensor has dims [1] plus the batch dim):
  inputs (all optional; exactly one of prompt / messages_json):
    prompt STRING | messages_json STRING (JSON [{"role","content"}], chat template applied
    with add_generation_prompt=True) | max_tokens INT32 (64) | temperature FP32 (1.0, 0 =
    greedy) | top_p FP32 (1.0) | top_k INT32 (0 = off) | repetition_penalty FP32 (1.0) |
    seed INT64 (absent or < 0 = random) | stop_json STRING (JSON list of stop strings) |
    adapter STRING ("" = base model) | stream BOOL (false)
  outputs: text STRING, prompt_tokens INT32, completion_tokens INT32,
    finish_reason STRING ("stop" | "length" | "cancelled"; "" on non-final stream chunks)

Continuous (in-flight) batching: execute() only validates and queues; one decode thread
owns the model. At every step it admits queued requests up to max_batch_size active rows,
prefills them together (left padding, attention mask, explicit position ids), merges their
KV cache into the running batch (left-padded with zeros along time, masked out), decodes
one token for every active row and drops finished or cancelled rows. Each row keeps its
own sampling parameters and torch.Generator, so a seeded request yields the same tokens
alone or batched, whenever it joins, streamed or not. Adapters load in the decode thread
between steps, so PEFT state is only touched by that thread.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import OrderedDict, deque
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

ADAPTER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
BASE = "__base__"
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class RequestError(Exception):
    """A problem with one request; turned into an error response for that request only."""

    def __init__(self, message: str, code: Any) -> None:
        super().__init__(message)
        self.code = code


def _code(name: str) -> Any:
    return getattr(pb_utils.TritonError, name, getattr(pb_utils.TritonError, "INTERNAL", None))


def _invalid(field: str, why: str) -> RequestError:
    return RequestError(f"INVALID_ARGUMENT: {field}: {why}", _code("INVALID_ARG"))


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


class Row:
    """Per-request decoding state (one instance per request)."""

    def __init__(self, request: Any) -> None:
        self.request = request
        self.sender = request.get_response_sender()
        self.prompt_ids: list[int] = []
        self.source = "prompt"  # the input the prompt came from, named in errors
        self.max_tokens = 64
        self.temperature = 1.0
        self.top_p = 1.0
        self.top_k = 0
        self.repetition_penalty = 1.0
        self.seed: int | None = None
        self.stops: list[str] = []
        self.adapter = ""
        self.stream = False
        self.generator: Any = None
        self.generated: list[int] = []
        self.raw = bytearray()  # bytes of the generated text (special tokens excluded)
        self.emitted = ""  # text already streamed
        self.text = ""  # final text
        self.finish: str | None = None  # set when the row is done
        self.finalized = False  # FINAL response sent
        self.seen: Any = None  # tensor of token ids for the repetition penalty


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.model_path = os.path.expandvars(params.get("model_path", "${LLMESH_LLM_PATH}"))
        self.adapter_dir = os.path.expandvars(params.get("adapter_dir", "${LLMESH_HOME}/adapters"))
        self.cache_size = max(1, int(params.get("adapter_cache_size", "8") or 8))
        threads = int(params.get("threads", "2") or 2)
        torch.set_num_threads(max(1, threads))
        if "$" in self.model_path or not os.path.isdir(self.model_path):
            raise pb_utils.TritonModelException(f"model_path {self.model_path!r} is not a folder (set LLMESH_LLM_PATH)")

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.base = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        self.base.eval()
        self.model: Any = self.base
        # transformers 5.24 renamed past_key_values -> cache (old name removed in 5.40)
        import inspect

        fwd = inspect.signature(self.base.forward).parameters
        self.cache_kw = "cache" if "cache" in fwd else "past_key_values"
        self.keep_kw = "logits_to_keep" if "logits_to_keep" in fwd else None
        self.peft = None  # PeftModel once the first adapter is loaded
        self.adapters: OrderedDict[str, str] = OrderedDict()  # LRU: name -> folder

        cfg = self.base.config
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 2048))
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        eos: set[int] = set()
        for src in (self.tokenizer.eos_token_id, getattr(self.base.generation_config, "eos_token_id", None)):
            if isinstance(src, int):
                eos.add(src)
            elif isinstance(src, (list, tuple)):
                eos.update(int(x) for x in src)
        self.eos_ids = eos
        self.eos_tensor = torch.tensor(sorted(eos), dtype=torch.long)

        # token id -> bytes (byte-level BPE); special / added tokens produce no text
        byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
        special = set(self.tokenizer.all_special_ids)
        special.update(getattr(self.tokenizer, "added_tokens_decoder", {}).keys())
        vocab_n = len(self.tokenizer)
        self.id_bytes: list[bytes] = []
        for i in range(max(vocab_n, cfg.vocab_size)):
            tok = self.tokenizer.convert_ids_to_tokens(i) if i < vocab_n else None
            if tok is None or i in special:
                self.id_bytes.append(b"")
            elif all(ch in byte_decoder for ch in tok):
                self.id_bytes.append(bytes(byte_decoder[ch] for ch in tok))
            else:  # not a byte-level token: fall back to the tokenizer
                self.id_bytes.append(self.tokenizer.decode([i]).encode("utf-8"))

        # Custom metrics on Triton's /metrics endpoint (next to nv_inference_*).
        tokens = pb_utils.MetricFamily(
            name="llmesh_llm_generated_tokens_total",
            description="Tokens sampled by the llm model",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        finished = pb_utils.MetricFamily(
            name="llmesh_llm_requests_total",
            description="Requests finished by the llm model, by finish reason",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        batches = pb_utils.MetricFamily(
            name="llmesh_llm_batches_total",
            description="Prefill batches: groups of requests admitted into the running batch together",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        steps = pb_utils.MetricFamily(
            name="llmesh_llm_decode_steps_total",
            description="Decode steps (one token for every active row)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        active = pb_utils.MetricFamily(
            name="llmesh_llm_active_rows_total",
            description="Sum over decode steps of the rows decoded (/ decode_steps_total = mean batch size)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        labels = {"model": "llm"}
        self.m_tokens = tokens.Metric(labels=labels)
        self.m_batches = batches.Metric(labels=labels)
        self.m_steps = steps.Metric(labels=labels)
        self.m_rows = active.Metric(labels=labels)
        self.m_finished = {
            reason: finished.Metric(labels={"model": "llm", "finish_reason": reason})
            for reason in ("stop", "length", "cancelled")
        }
        self._metric_families = (tokens, finished, batches, steps, active)  # keep the families alive
        # per-step counts, flushed in bulk: each Metric.increment is an IPC to the server
        self.pending = {"tokens": 0, "steps": 0, "rows": 0}
        self.flushed_at = time.monotonic()

        self.logger = pb_utils.Logger
        self.logger.log_info(
            f"llm: loaded {self.model_path} in {time.perf_counter() - t0:.2f}s "
            f"(vocab={cfg.vocab_size}, max_positions={self.max_positions}, threads={threads}, "
            f"adapter_dir={self.adapter_dir}, adapter_cache_size={self.cache_size})"
        )
        self._start_engine(config, threads)

    # ------------------------------------------------------------------ inputs

    @staticmethod
    def _scalar(request: Any, name: str) -> Any:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            return None
        arr = tensor.as_numpy()
        if arr.size != 1:
            raise _invalid(name, f"expected one value, got shape {list(arr.shape)}")
        return arr.reshape(-1)[0]

    def _string(self, request: Any, name: str) -> str | None:
        value = self._scalar(request, name)
        if value is None:
            return None
        if isinstance(value, bytes):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                raise _invalid(name, "not valid UTF-8") from None
        return str(value)

    def _parse(self, row: Row) -> None:
        req = row.request
        prompt = self._string(req, "prompt")
        messages_json = self._string(req, "messages_json")
        if (prompt is None) == (messages_json is None):
            raise _invalid("prompt", "exactly one of prompt or messages_json is required")
        if messages_json is not None:
            try:
                messages = json.loads(messages_json)
            except ValueError as exc:
                raise _invalid("messages_json", f"bad JSON ({exc})") from None
            if not isinstance(messages, list) or not messages:
                raise _invalid("messages_json", "must be a non-empty JSON list")
            for m in messages:
                if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                    raise _invalid("messages_json", 'each item needs string "role" and "content"')
            try:
                text = self.tokenizer.apply_chat_template(
                    [{"role": m["role"], "content": m["content"]} for m in messages],
                    add_generation_prompt=True,
                    tokenize=False,
                )
            except Exception as exc:  # template errors are the caller's input
                raise _invalid("messages_json", f"chat template failed ({exc})") from None
        else:
            text = prompt or ""
        row.source = "prompt" if prompt is not None else "messages_json"
        row.prompt_ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not row.prompt_ids:
            raise _invalid("prompt", "empty prompt")

        v = self._scalar(req, "max_tokens")
        row.max_tokens = 64 if v is None else int(v)
        if row.max_tokens < 1:
            raise _invalid("max_tokens", "must be >= 1")
        if len(row.prompt_ids) >= self.max_positions:
            raise _invalid(row.source, f"{len(row.prompt_ids)} tokens, the model's context is {self.max_positions}")
        if len(row.prompt_ids) + row.max_tokens > self.max_positions:
            raise _invalid(
                "max_tokens",
                f"prompt tokens ({len(row.prompt_ids)}) + max_tokens ({row.max_tokens}) "
                f"exceeds the context of {self.max_positions}",
            )
        v = self._scalar(req, "temperature")
        row.temperature = 1.0 if v is None else float(v)
        if not np.isfinite(row.temperature) or row.temperature < 0:
            raise _invalid("temperature", "must be >= 0")
        v = self._scalar(req, "top_p")
        row.top_p = 1.0 if v is None else float(v)
        if not np.isfinite(row.top_p) or not 0 < row.top_p <= 1:
            raise _invalid("top_p", "must be in (0, 1]")
        v = self._scalar(req, "top_k")
        row.top_k = 0 if v is None else int(v)
        if row.top_k < 0:
            raise _invalid("top_k", "must be >= 0")
        v = self._scalar(req, "repetition_penalty")
        row.repetition_penalty = 1.0 if v is None else float(v)
        if not np.isfinite(row.repetition_penalty) or row.repetition_penalty <= 0:
            raise _invalid("repetition_penalty", "must be > 0")
        v = self._scalar(req, "seed")
        row.seed = None if v is None or int(v) < 0 else int(v)  # negative = random
        stop_json = self._string(req, "stop_json")
        if stop_json:
            try:
                stops = json.loads(stop_json)
            except ValueError as exc:
                raise _invalid("stop_json", f"bad JSON ({exc})") from None
            if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
                raise _invalid("stop_json", "must be a JSON list of strings")
            row.stops = [s for s in stops if s]
        adapter = self._string(req, "adapter") or ""
        if adapter and not ADAPTER_RE.match(adapter):
            raise _invalid("adapter", f"invalid adapter name {adapter!r}")
        row.adapter = adapter
        v = self._scalar(req, "stream")
        row.stream = bool(v) if v is not None else False

        gen = self.torch.Generator()
        if row.seed is None:
            gen.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
        else:
            gen.manual_seed(row.seed & 0xFFFFFFFFFFFFFFFF)
        row.generator = gen

    # ------------------------------------------------------------------ adapters

    def _ensure_adapters(self, names: set[str]) -> dict[str, RequestError]:
        """Load missing adapters (LRU-bounded). Returns errors for names that failed."""
        errors: dict[str, RequestError] = {}
        for name in sorted(names):
            if name in self.adapters:
                self.adapters.move_to_end(name)
                continue
            folder = os.path.join(self.adapter_dir, name)
            if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
                errors[name] = RequestError(f"NOT_FOUND: adapter '{name}' not found", _code("NOT_FOUND"))
                continue
            t0 = time.perf_counter()
            try:
                if self.peft is None:
                    from peft import PeftModel

                    self.peft = PeftModel.from_pretrained(self.base, folder, adapter_name=name, is_trainable=False)
                    self.peft.eval()
                    self.model = self.peft
                else:
                    self.peft.load_adapter(folder, adapter_name=name, is_trainable=False)
            except Exception as exc:
                errors[name] = RequestError(
                    f"INVALID_ARGUMENT: adapter: cannot load adapter '{name}' ({exc})",
                    _code("INVALID_ARG"),
                )
                continue
            self.adapters[name] = folder
            self.logger.log_info(f"llm: loaded adapter {name!r} in {(time.perf_counter() - t0) * 1000:.1f} ms")
        # evict least recently used adapters not needed by this batch
        while len(self.adapters) > self.cache_size:
            victim = next((n for n in self.adapters if n not in names), None)
            if victim is None:
                break
            self.adapters.pop(victim)
            try:
                self.peft.delete_adapter(victim)
                self.logger.log_info(f"llm: evicted adapter {victim!r}")
            except Exception as exc:  # keep serving; the adapter just stays resident
                self.logger.log_warn(f"llm: could not evict adapter {victim!r}: {exc}")
        return errors

    # ------------------------------------------------------------------ responses

    def _response(self, text: str, row: Row, finish: str) -> Any:
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("text", np.array([[text.encode("utf-8")]], dtype=np.object_)),
                pb_utils.Tensor("prompt_tokens", np.array([[len(row.prompt_ids)]], dtype=np.int32)),
                pb_utils.Tensor("completion_tokens", np.array([[len(row.generated)]], dtype=np.int32)),
                pb_utils.Tensor("finish_reason", np.array([[finish.encode()]], dtype=np.object_)),
            ]
        )

    def _send_error(self, row: Row, err: RequestError) -> None:
        if row.finalized:
            return
        row.finalized = True
        row.finish = "error"
        try:
            row.sender.send(
                pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err), err.code)),
                flags=FINAL,
            )
        except Exception as exc:
            self.logger.log_warn(f"llm: could not send error response: {exc}")

    def _finalize(self, row: Row) -> None:
        if row.finalized:
            return
        row.finalized = True
        if row.finish in self.m_finished:
            self.m_finished[row.finish].increment(1)
        try:
            if row.finish == "cancelled":
                try:
                    rest = row.text[len(row.emitted) :] if row.stream else row.text
                    row.sender.send(self._response(rest, row, "cancelled"), flags=FINAL)
                except Exception:
                    row.sender.send(flags=FINAL)
            elif row.stream:
                rest = row.text[len(row.emitted) :]
                row.sender.send(self._response(rest, row, row.finish or "stop"), flags=FINAL)
            else:
                row.sender.send(self._response(row.text, row, row.finish or "stop"), flags=FINAL)
        except Exception as exc:
            self.logger.log_warn(f"llm: could not send final response: {exc}")

    # ------------------------------------------------------------------ text

    def _update_text(self, row: Row) -> None:
        """Recompute row.text after a new token; detect stop strings; stream deltas."""
        text = row.raw.decode("utf-8", errors="replace")
        if row.stops:
            lo = max(0, len(row.emitted) - max(len(s) for s in row.stops))
            cut = -1
            for s in row.stops:
                i = text.find(s, lo)
                if i != -1 and (cut == -1 or i < cut):
                    cut = i
            if cut != -1:
                row.text = text[:cut]
                row.finish = "stop"
                return
        row.text = text
        if not row.stream:
            return
        # hold back an incomplete UTF-8 tail and anything that may start a stop string
        stable = len(text)
        while stable > 0 and text[stable - 1] == "\ufffd":
            stable -= 1
        for s in row.stops:
            for k in range(min(len(s) - 1, stable), 0, -1):
                if text[stable - k : stable] == s[:k]:
                    stable -= k
                    break
        stable = max(stable, len(row.emitted))
        delta = text[len(row.emitted) : stable]
        if delta:
            try:
                row.sender.send(self._response(delta, row, ""))
                row.emitted += delta
            except Exception as exc:
                self.logger.log_warn(f"llm: could not stream: {exc}")

    # ------------------------------------------------------------------ sampling

    def _sample(self, row: Row, logits: Any) -> int:
        torch = self.torch
        logits = logits.float()
        if row.repetition_penalty != 1.0 and row.seen is not None and row.seen.numel():
            picked = logits.index_select(0, row.seen)
            picked = torch.where(picked < 0, picked * row.repetition_penalty, picked / row.repetition_penalty)
            logits = logits.index_copy(0, row.seen, picked)
        if row.temperature == 0:
            return int(torch.argmax(logits).item())
        logits = logits / row.temperature
        if row.top_k and row.top_k < logits.numel():
            kth = torch.topk(logits, row.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if row.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
            remove = cum - torch.softmax(sorted_logits, dim=-1) >= row.top_p
            remove[0] = False
            logits = logits.index_fill(0, order[remove], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=row.generator).item())

    @staticmethod
    def _is_cancelled(row: Row) -> bool:
        try:
            return bool(row.request.is_cancelled())
        except Exception:
            pass
        try:
            return bool(row.sender.is_cancelled())
        except Exception:
            return False

    # ------------------------------------------------------------------ execute

    def execute(self, requests: list[Any]) -> None:
        """Validate the requests and queue them for the decode thread; returns at once.

        Decoupled mode lets execute() return before responding: every answer goes through
        the request's response_sender, and the Row keeps the request alive until its FINAL.
        """
        rows: list[Row] = []
        for request in requests:
            try:
                row = Row(request)
            except Exception as exc:  # cannot even get a sender: nothing to answer on
                self.logger.log_error(f"llm: bad request object: {exc}")
                continue
            try:
                self._parse(row)
            except RequestError as err:
                self._send_error(row, err)
                continue
            except Exception as exc:
                self._send_error(row, RequestError(f"INVALID_ARGUMENT: request: {exc}", _code("INVALID_ARG")))
                continue
            rows.append(row)
        if rows:
            with self.wakeup:
                if self.stopping:  # finalize() already ran: nobody would decode them
                    self._fail(rows, _unavailable())
                    rows = []
                room = self.max_queue - len(self.queue)
                if len(rows) > room:  # bounded backlog: shed load instead of queueing forever
                    self._fail(
                        rows[max(0, room) :],
                        RequestError(
                            f"RESOURCE_EXHAUSTED: llm queue is full ({self.max_queue} waiting)", _code("UNAVAILABLE")
                        ),
                    )
                    rows = rows[: max(0, room)]
                if rows:
                    self.queue.extend(rows)
                    self.wakeup.notify()
        return None

    # ------------------------------------------------------------------ decode thread

    def _start_engine(self, config: dict[str, Any], threads: int) -> None:
        self.max_rows = max(1, int(config.get("max_batch_size") or 16))
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.max_queue = max(1, int(params.get("max_queue", "256") or 256))
        self.queue: deque[Row] = deque()  # validated rows waiting for a free batch slot
        self.wakeup = threading.Condition()
        self.stopping = False
        self.batch: Batch | None = None  # the running batch; touched only by the decode thread
        self.thread = threading.Thread(target=self._loop, args=(threads,), name="llm-decode", daemon=True)
        self.thread.start()

    def _loop(self, threads: int) -> None:
        """One step per iteration: admit queued rows, then decode one token for all rows."""
        torch = self.torch
        torch.set_num_threads(max(1, threads))  # per-thread setting with OpenMP
        with torch.inference_mode():  # thread-local, so entered here
            while True:
                new = self._take()
                if new is None:
                    break
                self._guard(self._reap_queued, [])
                if new:
                    self._guard(lambda: self._admit(new), new)  # a failed prefill fails only its rows
                if self.batch is not None:
                    self._guard(self._step, None)
        # stopping: nothing may hang
        self._fail(self.batch.rows if self.batch else [], _unavailable())
        self.batch = None
        self._fail(self._drain(), _unavailable())

    def _guard(self, fn: Any, rows: list[Row] | None) -> None:
        """Run fn; on an exception fail `rows` (None: the whole running batch) and go on."""
        try:
            fn()
        except Exception as exc:  # the decode thread must never die
            self.logger.log_error(f"llm: generation failed: {exc!r}")
            err = RequestError(f"INTERNAL: {exc}", _code("INTERNAL"))
            if rows is None:
                self._fail(self.batch.rows if self.batch else [], err)
                self.batch = None
            else:
                self._fail(rows, err)

    def _step(self) -> None:
        assert self.batch is not None
        self._decode_step(self.batch)
        self._prune()

    def _take(self) -> list[Row] | None:
        """Rows to admit now (up to the free slots); blocks while idle; None when stopping."""
        with self.wakeup:
            while not self.stopping and not self.queue and self.batch is None:
                self.wakeup.wait()
            if self.stopping:
                return None
            room = self.max_rows - (len(self.batch.rows) if self.batch else 0)
            if self.batch is not None and not self._mergeable(self.batch.cache):
                room = 0  # this cache cannot take new rows: they wait for the batch to drain
            return [self.queue.popleft() for _ in range(min(room, len(self.queue)))]

    def _drain(self) -> list[Row]:
        with self.wakeup:
            rows = list(self.queue)
            self.queue.clear()
        return rows

    def _reap_queued(self) -> None:
        """Finish queued rows whose client gave up (deadline, disconnect) without decoding them."""
        with self.wakeup:
            waiting = list(self.queue)
        for row in waiting:
            if not self._is_cancelled(row):
                continue
            with self.wakeup:
                if row not in self.queue:  # admitted or drained meanwhile
                    continue
                self.queue.remove(row)
            row.finish = "cancelled"
            self._finalize(row)

    def _fail(self, rows: list[Row], err: RequestError) -> None:
        for r in rows:
            self._send_error(r, err)

    # ------------------------------------------------------------------ steps

    def _admit(self, rows: list[Row]) -> None:
        """Load adapters, prefill the new rows (first token) and merge them into the batch."""
        running = self.batch.rows if self.batch else []
        names = {r.adapter for r in rows + running if r.adapter}  # running ones stay resident
        errors = self._ensure_adapters(names) if names else {}
        for r in rows:
            if r.adapter in errors:
                self._send_error(r, errors[r.adapter])
        rows = [r for r in rows if not r.finalized]
        if not rows:
            return
        new = self._prefill(rows)
        self.m_batches.increment(1)
        self.logger.log_info(
            f"llm: admitted {len(rows)} (running {len(running)}, queued {len(self.queue)}) "
            f"adapters={sorted({r.adapter or '<base>' for r in rows})}"
        )
        new = self._prune_batch(new)
        if new is None:
            return
        self.batch = new if self.batch is None else self._merge(self.batch, new)

    def _forward(self, rows: list[Row], ids: Any, mask: Any, pos: Any, cache: Any) -> tuple[Any, Any]:
        """One model call; returns (last-position logits, cache)."""
        kwargs: dict[str, Any] = {self.cache_kw: cache}
        if self.keep_kw:
            kwargs[self.keep_kw] = 1
        if self.peft is not None:  # LoRA layers are injected: name every row's adapter
            kwargs["adapter_names"] = [r.adapter or BASE for r in rows]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kwargs)
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = out.past_key_values
        return out.logits[:, -1, :], cache

    def _prefill(self, rows: list[Row]) -> Batch:
        """Left-padded prompts of the new rows in one forward; samples their first token."""
        torch = self.torch
        n = len(rows)
        lengths = [len(r.prompt_ids) for r in rows]
        width = max(lengths)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - lengths[i] :] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, width - lengths[i] :] = 1
            if r.repetition_penalty != 1.0:
                r.seen = torch.tensor(sorted(set(r.prompt_ids)), dtype=torch.long)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(rows, ids, mask, pos, None)
        batch = Batch(rows, cache, mask, pos[:, -1:] + 1)
        batch.next_ids = self._sample_all(rows, logits)
        return batch

    def _decode_step(self, b: Batch) -> None:
        """One token for every active row (the tokens sampled last step go in)."""
        torch = self.torch
        ids = torch.tensor(b.next_ids, dtype=torch.long).unsqueeze(1)
        mask = torch.cat([b.mask, torch.ones((len(b.rows), 1), dtype=torch.long)], 1)
        logits, b.cache = self._forward(b.rows, ids, mask, b.pos, b.cache)
        b.mask, b.pos = mask, b.pos + 1
        self.pending["steps"] += 1
        self.pending["rows"] += len(b.rows)
        b.next_ids = self._sample_all(b.rows, logits)
        if time.monotonic() - self.flushed_at > 0.5:  # long generations still show progress
            self._flush_metrics()

    def _sample_all(self, rows: list[Row], logits: Any) -> list[int]:
        """Next token per row (pad for rows that just got cancelled); updates text/streams."""
        out: list[int] = []
        for j, r in enumerate(rows):
            if self._is_cancelled(r):
                r.finish = "cancelled"
                out.append(self.pad_id)
                continue
            tok = self._sample(r, logits[j])
            out.append(tok)
            self._accept(r, tok)
        self.pending["tokens"] += sum(1 for r in rows if r.finish != "cancelled")
        return out

    def _flush_metrics(self) -> None:
        for key, metric in (("tokens", self.m_tokens), ("steps", self.m_steps), ("rows", self.m_rows)):
            if self.pending[key]:
                metric.increment(self.pending[key])
                self.pending[key] = 0
        self.flushed_at = time.monotonic()

    def _accept(self, r: Row, tok: int) -> None:
        r.generated.append(tok)
        if r.seen is not None:
            r.seen = self.torch.unique(self.torch.cat([r.seen, self.torch.tensor([tok])]))
        if tok in self.eos_ids:
            r.finish = "stop"
            r.text = r.raw.decode("utf-8", errors="replace")
            return
        r.raw += self.id_bytes[tok] if tok < len(self.id_bytes) else b""
        self._update_text(r)
        if r.finish is None and len(r.generated) >= r.max_tokens:
            r.finish = "length"
            r.text = r.raw.decode("utf-8", errors="replace")
            self._update_text_final(r)  # stop strings may still cut it

    def _prune(self) -> None:
        if self.batch is not None:
            self.batch = self._prune_batch(self.batch)

    def _prune_batch(self, b: Batch) -> Batch | None:
        """Send FINAL for finished rows and drop them (and all-padding columns) from the cache."""
        keep = [j for j, r in enumerate(b.rows) if r.finish is None]
        if len(keep) != len(b.rows):  # counters are current by the time a client sees FINAL
            self._flush_metrics()
        for r in b.rows:
            if r.finish is not None:
                self._finalize(r)
        if not keep:
            return None
        if len(keep) != len(b.rows):
            idx = self.torch.tensor(keep, dtype=self.torch.long)
            b.cache = _select_cache(b.cache, idx)
            b.mask, b.pos = b.mask.index_select(0, idx), b.pos.index_select(0, idx)
            b.rows = [b.rows[j] for j in keep]
            b.next_ids = [b.next_ids[j] for j in keep]
            # columns no remaining row attends to (left padding of finished rows) are dead weight
            lead = int(b.mask.any(0).long().argmax())
            if lead and self._mergeable(b.cache):
                b.cache = _map_cache(b.cache, lambda t: t[:, :, lead:])
                b.mask = b.mask[:, lead:]
        return b

    def _merge(self, a: Batch, b: Batch) -> Batch:
        """Join two batches: left-pad the shorter along time (mask 0), stack along rows."""
        torch = self.torch
        width = max(a.mask.shape[1], b.mask.shape[1])
        pad_a, pad_b = width - a.mask.shape[1], width - b.mask.shape[1]
        cache = _merge_cache(a.cache, b.cache, pad_a, pad_b)
        mask = torch.cat([_pad_left(a.mask, pad_a, 1), _pad_left(b.mask, pad_b, 1)], 0)
        merged = Batch(a.rows + b.rows, cache, mask, torch.cat([a.pos, b.pos], 0))
        merged.next_ids = a.next_ids + b.next_ids
        return merged

    @staticmethod
    def _mergeable(cache: Any) -> bool:
        """Plain full-attention caches only: sliding/static/quantized layers keep extra state."""
        if isinstance(cache, tuple):
            return True
        layers = getattr(cache, "layers", None)
        return layers is not None and all(type(layer).__name__ == "DynamicLayer" for layer in layers)

    def _update_text_final(self, row: Row) -> None:
        if row.stops:
            text = row.raw.decode("utf-8", errors="replace")
            cut = min((i for i in (text.find(s) for s in row.stops) if i != -1), default=-1)
            if cut != -1:
                row.text = text[:cut]
                row.finish = "stop"

    def finalize(self) -> None:
        """Stop the decode thread; every queued or running request gets a FINAL error."""
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify_all()
        self.thread.join(timeout=5.0)
        if self.thread.is_alive():  # stuck in a forward pass: it fails its own rows when back
            self.logger.log_warn("llm: decode thread did not stop within 5 s")
        self._fail(self._drain(), _unavailable())
        self.logger.log_info("llm: unloading")


class Batch:
    """The running batch: rows in cache order and the tensors the next decode step needs."""

    def __init__(self, rows: list[Row], cache: Any, mask: Any, pos: Any) -> None:
        self.rows = rows
        self.cache = cache  # KV cache, batch axis = rows, time axis = mask's columns
        self.mask = mask  # [rows, time] attention mask of the cached positions
        self.pos = pos  # [rows, 1] position id of each row's next token
        self.next_ids: list[int] = []  # tokens sampled last step, fed in the next one


def _unavailable() -> RequestError:
    return RequestError("UNAVAILABLE: llm model is shutting down", _code("UNAVAILABLE"))


def _pad_left(t: Any, n: int, dim: int) -> Any:
    """Zeros prepended along `dim` (zero keys/values under a zero mask are never attended)."""
    if n == 0:
        return t
    import torch

    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim)


def _cache_tensors(cache: Any) -> list[tuple[Any, str, Any]]:
    """(holder, attribute, tensor) for every key/value tensor of a DynamicCache."""
    return [
        (layer, name, getattr(layer, name))
        for layer in cache.layers
        for name in ("keys", "values")
        if getattr(layer, name, None) is not None and getattr(layer, name).dim() == 4
    ]


def _map_cache(cache: Any, fn: Any) -> Any:
    if isinstance(cache, tuple):  # legacy ((k, v), ...) per layer
        return tuple(tuple(fn(t) for t in layer) for layer in cache)
    for holder, name, t in _cache_tensors(cache):
        setattr(holder, name, fn(t))
    return cache


def _merge_cache(a: Any, b: Any, pad_a: int, pad_b: int) -> Any:
    """Cache of a's rows then b's rows; tensors are [rows, heads, time, head_dim]."""
    import torch

    def join(x: Any, y: Any) -> Any:
        return torch.cat([_pad_left(x, pad_a, 2), _pad_left(y, pad_b, 2)], 0)

    if isinstance(a, tuple):
        return tuple(tuple(join(x, y) for x, y in zip(la, lb)) for la, lb in zip(a, b))
    ta, tb = _cache_tensors(a), _cache_tensors(b)
    if len(ta) != len(tb):
        raise RuntimeError("KV caches of different shapes cannot be merged")
    joined = [join(x, y) for (_, _, x), (_, _, y) in zip(ta, tb)]  # all built before any is set
    for (holder, name, _), t in zip(ta, joined):
        setattr(holder, name, t)
    return a


def _select_cache(past: Any, idx: Any) -> Any:
    if hasattr(past, "batch_select_indices"):
        past.batch_select_indices(idx)
        return past
    layers = getattr(past, "layers", None)
    if layers is not None:
        for layer in layers:
            layer.batch_select_indices(idx)
        return past
    if isinstance(past, tuple):
        return tuple(tuple(t.index_select(0, idx) for t in layer) for layer in past)
    raise RuntimeError("cannot select rows of the KV cache")
