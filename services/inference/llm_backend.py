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
from prometheus_client import Counter, Histogram
from tritonclient.grpc import InferInput, service_pb2, service_pb2_grpc
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
from llmesh.services.inference import triton_wire as wire
from llmesh.services.inference.sampling import Sampling
from llmesh.services.inference.triton_wire import InputValue

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


def input_values(inp: GenerationInput, stream: bool) -> list[InputValue]:
    """Always the full set of inputs, with neutral values for unset ones: Triton's
    dynamic batcher only batches requests that carry the same input names."""
    s = inp.sampling
    if inp.prompt is not None:
        text: InputValue = ("prompt", "BYTES", inp.prompt)
    else:
        text = ("messages_json", "BYTES", json.dumps(list(inp.messages or []), ensure_ascii=False))
    return [
        text,
        ("max_tokens", "INT32", s.max_tokens),
        ("temperature", "FP32", s.temperature),
        ("top_p", "FP32", s.top_p),
        ("top_k", "INT32", s.top_k),
        ("repetition_penalty", "FP32", s.repetition_penalty),
        ("seed", "INT64", -1 if s.seed is None else s.seed),  # negative: random
        ("stop_json", "BYTES", json.dumps(list(s.stop), ensure_ascii=False)),
        ("adapter", "BYTES", inp.adapter),
        ("stream", "BOOL", stream),
        ("raw", "BOOL", inp.raw),
        ("response_format_json", "BYTES", inp.response_format),
    ]


_NP_TYPES = {"BYTES": np.object_, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32, "BOOL": np.bool_}


def build_inputs(inp: GenerationInput, stream: bool) -> list[InferInput]:
    """The same inputs as tritonclient objects (for callers of tritonclient's API: the bench)."""
    tensors = []
    for name, dtype, value in input_values(inp, stream):
        arr = np.array([[value.encode() if isinstance(value, str) else value]], dtype=_NP_TYPES[dtype])
        t = InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        tensors.append(t)
    return tensors


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


def model_error_of(out: dict[str, bytes]) -> ModelError | None:
    """The error a response's outputs carry, None for a generation chunk."""
    code = wire.string(out.get("error_code"))
    if not code:
        return None
    return ModelError(code, wire.string(out.get("error_field")) or "", wire.string(out.get("error_message")) or "")


def chunk_of(out: dict[str, bytes]) -> Chunk | None:
    """A generation chunk from a response's outputs; None for a flags-only final response."""
    text = wire.string(out.get("text"))
    if text is None:
        return None
    return Chunk(
        text=text,
        prompt_tokens=wire.int32(out.get("prompt_tokens")),
        completion_tokens=wire.int32(out.get("completion_tokens")),
        finish_reason=wire.string(out.get("finish_reason")) or "",
        structured=wire.string(out.get("structured_json")) or "",
    )


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
    """One channel to Triton; every generation is its own bidirectional stream call, so
    cancelling it (the consumer stops, the caller's deadline passes) cancels exactly that
    Triton request."""

    def __init__(self, address: str, model: str) -> None:
        self.address = address
        self.model = model
        self._channel = grpc.aio.insecure_channel(address, options=channel_options() + _RECONNECT)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    async def ready(self) -> None:
        """Raise Unavailable unless Triton is live and the model is loaded."""
        try:
            reply = await self._stub.ModelReady(service_pb2.ModelReadyRequest(name=self.model), timeout=10)
        except grpc.aio.AioRpcError as e:
            raise Unavailable(f"triton at {self.address}: {e.details()}") from e
        if not reply.ready:
            raise Unavailable(f"triton model '{self.model}' is not ready")

    async def models(self) -> list[tuple[str, str, bool]]:
        try:
            index = await self._stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(), timeout=10)
        except grpc.aio.AioRpcError as e:
            raise Unavailable(f"triton at {self.address}: {e.details()}") from e
        return [(m.name, m.version, m.state == "READY") for m in index.models]

    async def stream(self, inp: GenerationInput, *, timeout: float, stream: bool = True) -> AsyncIterator[Chunk]:
        """Chunks from Triton; cancelling the consumer cancels the Triton request."""
        request = wire.infer_request(self.model, input_values(inp, stream), OUTPUTS)
        call = self._stub.ModelStreamInfer(timeout=timeout)
        started = time.perf_counter()
        try:
            await call.write(request)
            await call.done_writing()
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    break
                if response.error_message:
                    raise map_error(InferenceServerException(msg=response.error_message))
                out = wire.outputs(response.infer_response)
                failed = model_error_of(out)
                if failed is not None:  # the model refused or failed this request
                    raise model_error(failed, inp)
                chunk = chunk_of(out)
                if chunk is None:  # a flags-only final response
                    break
                if chunk.finish_reason:  # recorded before the last yield: a consumer may stop here
                    _observe(inp.adapter, "ok", started)
                yield chunk
                if chunk.finish_reason:
                    return
        except grpc.aio.AioRpcError as e:
            _observe(inp.adapter, "error", started)
            raise map_error(e) from e
        finally:
            call.cancel()
        raise Unavailable("triton closed the stream before the final response")

    async def complete(self, inp: GenerationInput, *, timeout: float) -> Chunk:
        """A whole generation in one response (batched by Triton's dynamic batcher)."""
        async for chunk in self.stream(inp, timeout=timeout, stream=False):
            if chunk.finish_reason:
                return chunk
        raise Unavailable("triton returned no final response")

    async def close(self) -> None:
        await self._channel.close()
