"""The model's custom metrics on Triton's /metrics endpoint (next to nv_inference_*).

Per-step counts are summed here and flushed in bulk: each Metric.increment is an IPC to the
server. They are flushed before a FINAL response, so counters are current when a client sees it.
"""

from __future__ import annotations

import time
from typing import Any

import triton_python_backend_utils as pb_utils

FINISH_REASONS = ("stop", "length", "cancelled")


def _counter(name: str, description: str) -> Any:
    return pb_utils.MetricFamily(name=name, description=description, kind=pb_utils.MetricFamily.COUNTER)


class Metrics:
    def __init__(self, model: str = "llm") -> None:
        tokens = _counter("llmesh_llm_generated_tokens_total", "Tokens sampled by the llm model")
        finished = _counter("llmesh_llm_requests_total", "Requests finished by the llm model, by finish reason")
        batches = _counter(
            "llmesh_llm_batches_total",
            "Prefill batches: groups of requests admitted into the running batch together",
        )
        steps = _counter("llmesh_llm_decode_steps_total", "Decode steps (one token for every active row)")
        active = _counter(
            "llmesh_llm_active_rows_total",
            "Sum over decode steps of the rows decoded (/ decode_steps_total = mean batch size)",
        )
        prompt = _counter("llmesh_llm_prompt_tokens_total", "Prompt tokens prefilled (reused ones included)")
        reused = _counter(
            "llmesh_llm_prefix_reused_tokens_total",
            "Prompt tokens whose keys/values came from the prefix cache instead of a forward pass",
        )
        labels = {"model": model}
        self._counters = {
            "tokens": tokens.Metric(labels=labels),
            "steps": steps.Metric(labels=labels),
            "rows": active.Metric(labels=labels),
            "prompt": prompt.Metric(labels=labels),
            "reused": reused.Metric(labels=labels),
        }
        self.batches = batches.Metric(labels=labels)
        self.finished = {
            reason: finished.Metric(labels={"model": model, "finish_reason": reason}) for reason in FINISH_REASONS
        }
        self._families = (tokens, finished, batches, steps, active, prompt, reused)  # keep the families alive
        self.pending = dict.fromkeys(self._counters, 0)
        self.flushed_at = time.monotonic()

    def count(self, tokens: int = 0, steps: int = 0, rows: int = 0, prompt: int = 0, reused: int = 0) -> None:
        self.pending["tokens"] += tokens
        self.pending["steps"] += steps
        self.pending["rows"] += rows
        self.pending["prompt"] += prompt
        self.pending["reused"] += reused

    def finish(self, reason: str | None) -> None:
        if reason is not None and reason in self.finished:
            self.finished[reason].increment(1)

    def flush(self) -> None:
        for key, metric in self._counters.items():
            if self.pending[key]:
                metric.increment(self.pending[key])
                self.pending[key] = 0
        self.flushed_at = time.monotonic()

    def flush_if_due(self, every_s: float = 0.5) -> None:
        """Long generations still show progress."""
        if time.monotonic() - self.flushed_at > every_s:
            self.flush()
