"""The Triton ``llm`` model as seen by the inference service.

Every call goes through Triton's bidirectional stream API (the model is
decoupled); a unary generation is one request answered by one final response.
Errors are mapped here, once, to domain errors: the model's own (a final response
with error_code / error_field / error_message outputs, see triton_models/llm/1/
llm_errors.py) through one table, Triton's (server down, model not ready) by kind.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import tritonclient.grpc.aio as triton
from prometheus_client import Counter, Histogram
from tritonclient.grpc import InferInput, InferRequestedOutput, InferResult
from tritonclient.utils import InferenceServerException

from llmesh.runtime.channels import channel_options
from llmesh.runtime.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    LlmeshError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from llmesh.services.inference.sampling import Sampling

ADAPTER_REQUESTS = Counter(
    "llmesh_adapter_requests_total", "Generations per adapter version (A/B arms) and outcome", ["adapter", "outcome"]
)
ADAPTER_LATENCY = Histogram(
    "llmesh_adapter_latency_seconds",
    "Time to the last token per adapter version",
    ["adapter"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


def _observe(adapter: str, outcome: str, started: float) -> None:
    """Per adapter version: what an A/B split's arms are compared on."""
    arm = adapter or "<base>"
    ADAPTER_REQUESTS.labels(arm, outcome).inc()
    if outcome == "ok":
        ADAPTER_LATENCY.labels(arm).observe(time.perf_counter() - started)


OUTPUTS = (
    "text",
    "prompt_tokens",
    "completion_tokens",
    "finish_reason",
    "structured_json",
    "error_code",
    "error_field",
    "error_message",
)
# Reconnect quickly after Triton restarts instead of gRPC's default backoff (up to 120 s).
_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass(frozen=True)
class GenerationInput:
    sampling: Sampling
    prompt: str | None = None
    messages: Sequence[dict[str, str]] | None = None
    adapter: str = ""
    raw: bool = False  # prompt sent as is (no chat template)
    response_format: str = ""  # the model's response_format_json ("" = unconstrained)


@dataclass(frozen=True)
class Chunk:
    """A text delta (streaming) or the whole text (unary); ``finish_reason`` set on the last."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "" until the last chunk, then "stop" | "length" | "cancelled"
    structured: str = ""  # last chunk of a constrained request: the model's structured_json


def _tensor(name: str, value: object, dtype: str) -> InferInput:
    np_type = {"BYTES": np.object_, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32, "BOOL": np.bool_}[dtype]
    arr = np.array([[value.encode() if isinstance(value, str) else value]], dtype=np_type)
    t = InferInput(name, list(arr.shape), dtype)
    t.set_data_from_numpy(arr)
    return t


def build_inputs(inp: GenerationInput, stream: bool) -> list[InferInput]:
    """Always the full set of inputs, with neutral values for unset ones: Triton's
    dynamic batcher only batches requests that carry the same input names."""
    s = inp.sampling
    if inp.prompt is not None:
        text = _tensor("prompt", inp.prompt, "BYTES")
    else:
        text = _tensor("messages_json", json.dumps(list(inp.messages or []), ensure_ascii=False), "BYTES")
    return [
        text,
        _tensor("max_tokens", s.max_tokens, "INT32"),
        _tensor("temperature", s.temperature, "FP32"),
        _tensor("top_p", s.top_p, "FP32"),
        _tensor("top_k", s.top_k, "INT32"),
        _tensor("repetition_penalty", s.repetition_penalty, "FP32"),
        _tensor("seed", -1 if s.seed is None else s.seed, "INT64"),  # negative: random
        _tensor("stop_json", json.dumps(list(s.stop), ensure_ascii=False), "BYTES"),
        _tensor("adapter", inp.adapter, "BYTES"),
        _tensor("stream", stream, "BOOL"),
        _tensor("raw", inp.raw, "BOOL"),
        _tensor("response_format_json", inp.response_format, "BYTES"),
    ]


# The model's input names → the API's field names.
API_FIELDS = {
    "messages_json": "message",
    "stop_json": "sampling.stop",
    "max_tokens": "sampling.max_tokens",
    "temperature": "sampling.temperature",
    "top_p": "sampling.top_p",
    "top_k": "sampling.top_k",
    "seed": "sampling.seed",
    "repetition_penalty": "sampling.repetition_penalty",
    "response_format_json": "response_format",
}


@dataclass(frozen=True)
class ModelError:
    """What the model's error outputs say: a code, the model input at fault ("" if none), why."""

    code: str
    field: str
    message: str


def _string_output(result: InferResult, name: str) -> str | None:
    arr = result.as_numpy(name)
    return None if arr is None else str(arr.reshape(-1)[0].decode("utf-8"))


def model_error_of(result: InferResult) -> ModelError | None:
    """The error a response carries, None for a generation chunk."""
    code = _string_output(result, "error_code")
    if not code:
        return None
    return ModelError(code, _string_output(result, "error_field") or "", _string_output(result, "error_message") or "")


# The model's error codes → domain errors. NOT_FOUND names the input whose value is missing
# (only ever "adapter"): the service reports the name it sent.
_MODEL_ERRORS: dict[str, Callable[[ModelError, GenerationInput], LlmeshError]] = {
    "INVALID_ARGUMENT": lambda e, inp: InvalidArgument(API_FIELDS.get(e.field, e.field), e.message),
    "NOT_FOUND": lambda e, inp: NotFound(e.field or "adapter", inp.adapter),
    "RESOURCE_EXHAUSTED": lambda e, inp: ResourceExhausted(e.message, retry_after_s=1.0),
    "UNAVAILABLE": lambda e, inp: Unavailable(e.message, retry_after_s=1.0),
    "INTERNAL": lambda e, inp: Unavailable(f"llm model error: {e.message}", retry_after_s=1.0),
}


def model_error(err: ModelError, inp: GenerationInput) -> LlmeshError:
    """A model-reported error → domain error (a code this table does not know is UNAVAILABLE)."""
    make = _MODEL_ERRORS.get(err.code)
    if make is None:
        return Unavailable(f"llm model error ({err.code}): {err.message}", retry_after_s=1.0)
    return make(err, inp)


def map_error(exc: BaseException) -> LlmeshError:
    """Triton/gRPC failure → domain error (never INTERNAL for a peer being down)."""
    if isinstance(exc, grpc.aio.AioRpcError):
        code = exc.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded("deadline exceeded while generating")
        if code == grpc.StatusCode.CANCELLED:
            return Cancelled("generation cancelled")
        return Unavailable(f"triton unavailable: {code.name}: {exc.details()}", retry_after_s=1.0)
    msg = str(exc.message() if isinstance(exc, InferenceServerException) else exc) or repr(exc)
    if "unknown model" in msg or "not ready" in msg or "not found" in msg:
        return Unavailable(f"model not available: {msg}", retry_after_s=2.0)
    return Unavailable(f"triton error: {msg}", retry_after_s=1.0)


class LlmBackend:
    def __init__(self, address: str, model: str) -> None:
        self.address = address
        self.model = model
        self._client = triton.InferenceServerClient(address, channel_args=channel_options() + _RECONNECT)

    async def ready(self) -> None:
        """Raise Unavailable unless Triton is live and the model is loaded."""
        try:
            if not await self._client.is_model_ready(self.model):
                raise Unavailable(f"triton model '{self.model}' is not ready")
        except InferenceServerException as e:
            raise Unavailable(f"triton at {self.address}: {e.message()}") from e

    async def models(self) -> list[tuple[str, str, bool]]:
        try:
            index = await self._client.get_model_repository_index(as_json=True)
        except InferenceServerException as e:
            raise Unavailable(f"triton at {self.address}: {e.message()}") from e
        return [(m["name"], m.get("version", ""), m.get("state") == "READY") for m in index.get("models", [])]

    async def stream(self, inp: GenerationInput, *, timeout: float, stream: bool = True) -> AsyncIterator[Chunk]:
        """Chunks from Triton; cancelling the consumer cancels the Triton request."""
        request: dict[str, object] = {
            "model_name": self.model,
            "inputs": build_inputs(inp, stream),
            "outputs": [InferRequestedOutput(n) for n in OUTPUTS],
        }

        async def requests() -> AsyncIterator[dict[str, object]]:
            yield request

        responses = self._client.stream_infer(requests(), stream_timeout=timeout)
        started = time.perf_counter()
        try:
            async for result, error in responses:
                if error is not None:
                    raise map_error(error)
                failed = model_error_of(result)
                if failed is not None:  # the model refused or failed this request
                    raise model_error(failed, inp)
                if result.as_numpy("text") is None:  # a flags-only final response
                    break
                chunk = Chunk(
                    text=result.as_numpy("text").reshape(-1)[0].decode("utf-8"),
                    prompt_tokens=int(result.as_numpy("prompt_tokens").reshape(-1)[0]),
                    completion_tokens=int(result.as_numpy("completion_tokens").reshape(-1)[0]),
                    finish_reason=result.as_numpy("finish_reason").reshape(-1)[0].decode(),
                    structured=_string_output(result, "structured_json") or "",
                )
                if chunk.finish_reason:  # recorded before the last yield: a consumer may stop here
                    _observe(inp.adapter, "ok", started)
                yield chunk
                if chunk.finish_reason:
                    return
        except (grpc.aio.AioRpcError, InferenceServerException) as e:
            _observe(inp.adapter, "error", started)
            raise map_error(e) from e
        finally:
            responses.cancel()
        raise Unavailable("triton closed the stream before the final response")

    async def complete(self, inp: GenerationInput, *, timeout: float) -> Chunk:
        """A whole generation in one response (batched by Triton's dynamic batcher)."""
        async for chunk in self.stream(inp, timeout=timeout, stream=False):
            if chunk.finish_reason:
                return chunk
        raise Unavailable("triton returned no final response")

    async def close(self) -> None:
        await self._client.close()
