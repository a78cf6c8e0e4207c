"""Triton Python backend: batched, streaming causal-LM generation with per-request LoRA.

This file is the TritonPythonModel shell (load, wire, hand requests over); the work is done by
the modules beside it, which Triton's Python backend imports as top-level modules (it puts this
folder on sys.path; the stub ignores PYTHONPATH, so they only import the standard library,
numpy, torch, transformers and peft):
  llm_request    inputs → a validated Row (see its docstring for the input contract)
  llm_batcher    the decode thread: continuous batching, prefill, decode steps
  llm_sampling   one row's next token      llm_kvcache   merging / pruning KV caches
  llm_text       tokens → text, stop strings, streamable deltas
  llm_adapters   LoRA adapters, LRU-bounded, loaded lazily from the adapter store
  llm_quant      fp16/int8 packed Linear layers (parameter quantization: auto | fp16 | int8 | none)
  llm_prefix     prefix cache: KV of recent prompts and chats, reused at prefill (prefix_cache_mb)
  llm_responses  stream chunks, FINAL answers, error responses
  llm_errors     the error codes that cross the Triton boundary  llm_metrics  /metrics counters

Outputs (see config.pbtxt): text STRING, prompt_tokens INT32, completion_tokens INT32,
finish_reason STRING ("stop" | "length" | "cancelled"; "" on non-final stream chunks); a
failed request instead gets one FINAL response with error_code, error_field, error_message.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch
import triton_python_backend_utils as pb_utils
from llm_adapters import AdapterCache
from llm_batcher import Batcher
from llm_errors import RequestError, invalid
from llm_metrics import Metrics
from llm_quant import quantize, resolve
from llm_request import Row, parse
from llm_responses import pace_streams, send_error


def _parameters(config: dict[str, Any]) -> dict[str, str]:
    return {k: str(v.get("string_value", "")) for k, v in config.get("parameters", {}).items()}


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = json.loads(args["model_config"])
        params = _parameters(config)
        self.model_path = os.path.expandvars(params.get("model_path", "${LLMESH_LLM_PATH}"))
        adapter_dir = os.path.expandvars(params.get("adapter_dir", "${LLMESH_HOME}/adapters"))
        cache_size = max(1, int(params.get("adapter_cache_size", "8") or 8))
        threads = max(1, int(params.get("threads", "2") or 2))
        max_queue = max(1, int(params.get("max_queue", "256") or 256))
        prefix_mb = max(0.0, float(params.get("prefix_cache_mb", "0") or 0))
        pace_streams(float(params.get("stream_interval_ms", "0") or 0))
        torch.set_num_threads(threads)
        if "$" in self.model_path or not os.path.isdir(self.model_path):
            raise pb_utils.TritonModelException(f"model_path {self.model_path!r} is not a folder (set LLMESH_LLM_PATH)")

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        base: Any = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        base.eval()
        n_params = sum(p.numel() for p in base.parameters())
        try:
            quant = resolve(params.get("quantization", "auto"), n_params)
        except ValueError as exc:
            raise pb_utils.TritonModelException(str(exc)) from None
        quantized = quantize(base, quant)
        self.max_positions = int(getattr(base.config, "max_position_embeddings", 2048))
        self.adapters = AdapterCache(base, adapter_dir, cache_size)
        self.engine = Batcher(
            base,
            self.tokenizer,
            self.adapters,
            Metrics(str(config.get("name") or "llm")),
            max_rows=max(1, int(config.get("max_batch_size") or 16)),
            max_queue=max_queue,
            prefix_cache_bytes=int(prefix_mb * 2**20),
        )
        pb_utils.Logger.log_info(
            f"llm: loaded {self.model_path} in {time.perf_counter() - t0:.2f}s "
            f"(vocab={base.config.vocab_size}, max_positions={self.max_positions}, threads={threads}, "
            f"quantization={quant} ({quantized} layers of {n_params / 1e6:.1f}M params), "
            f"adapter_dir={adapter_dir}, adapter_cache_size={cache_size}, prefix_cache_mb={prefix_mb:g})"
        )
        self.engine.start(threads)

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
                pb_utils.Logger.log_error(f"llm: bad request object: {exc}")
                continue
            try:
                parse(row, self.tokenizer, self.max_positions)
            except RequestError as err:
                send_error(row, err)
                continue
            except Exception as exc:
                send_error(row, invalid("request", str(exc)))
                continue
            rows.append(row)
        if rows:
            self.engine.submit(rows)
        return None

    def finalize(self) -> None:
        """Stop the decode thread; every queued or running request gets a FINAL error."""
        self.engine.stop()
        pb_utils.Logger.log_info("llm: unloading")
