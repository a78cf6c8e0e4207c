"""The Triton ``llm`` model (triton_models/llm/1) run in-process, without tritonserver.

``load_llm`` imports the model folder as Triton's Python backend does (the folder on sys.path,
its ``llm_*`` modules imported as top-level modules, ``triton_python_backend_utils`` provided
by the host) with a fake of that utils module recording what the model sends.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import pathlib
import sys
import threading
import types
from typing import Any

import numpy as np

_DTYPES = {
    "max_tokens": np.int32,
    "top_k": np.int32,
    "seed": np.int64,
    "stream": np.bool_,
    "temperature": np.float32,
    "top_p": np.float32,
    "repetition_penalty": np.float32,
}


class FakeSender:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, int]] = []
        self.done = threading.Event()  # set on the FINAL response (sent by the decode thread)

    def send(self, response: Any = None, flags: int = 0) -> None:
        self.sent.append((response, flags))
        if flags & 1:
            self.done.set()


class FakeRequest:
    def __init__(self, inputs: dict[str, object], cancel_after: int | None = None) -> None:
        self.inputs = inputs
        self.sender = FakeSender()
        self.cancel_after = cancel_after
        self.polls = 0

    def get_response_sender(self) -> FakeSender:
        return self.sender

    def is_cancelled(self) -> bool:
        self.polls += 1
        return self.cancel_after is not None and self.polls > self.cancel_after


class FakeMetric:
    def __init__(self) -> None:
        self.increments: list[float] = []  # every increment, in order

    def increment(self, v: float) -> None:
        self.increments.append(v)


class _Tensor:
    def __init__(self, name: str, arr: np.ndarray[Any, Any]) -> None:
        self.name, self.arr = name, arr

    def as_numpy(self) -> np.ndarray[Any, Any]:
        return self.arr


class _TritonError:
    NOT_FOUND, INVALID_ARG, INTERNAL, UNAVAILABLE = "NOT_FOUND", "INVALID_ARG", "INTERNAL", "UNAVAILABLE"

    def __init__(self, msg: str, code: str = "INTERNAL") -> None:
        self.msg, self.code = msg, code


class _InferenceResponse:
    def __init__(self, output_tensors: list[_Tensor] | None = None, error: _TritonError | None = None) -> None:
        self.outputs = {t.name: t.arr.reshape(-1)[0] for t in (output_tensors or [])}
        self.error = error


class _Logger:
    @staticmethod
    def log_info(msg: str) -> None: ...

    log_warn = log_error = log_info


class _MetricFamily:
    COUNTER, GAUGE = "counter", "gauge"

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name = name

    def Metric(self, labels: dict[str, str]) -> FakeMetric:
        return FakeMetric()


def _get_input_tensor_by_name(request: FakeRequest, name: str) -> _Tensor | None:
    if name not in request.inputs:
        return None
    v = request.inputs[name]
    arr = np.array([[v.encode() if isinstance(v, str) else v]], dtype=_DTYPES.get(name, np.object_))
    return _Tensor(name, arr)


def fake_pb_utils() -> types.ModuleType:
    pb = types.ModuleType("triton_python_backend_utils")
    for name, value in {
        "TRITONSERVER_RESPONSE_COMPLETE_FINAL": 1,
        "Tensor": _Tensor,
        "TritonError": _TritonError,
        "InferenceResponse": _InferenceResponse,
        "Logger": _Logger,
        "TritonModelException": RuntimeError,
        "MetricFamily": _MetricFamily,
        "get_input_tensor_by_name": _get_input_tensor_by_name,
    }.items():
        setattr(pb, name, value)
    return pb


def model_folder(model: str = "llm") -> pathlib.Path:
    """triton_models/<model>/1, found through the installed package (as the launcher does)."""
    folder = importlib.resources.files("llmesh.triton_models").joinpath(model, "1")
    assert isinstance(folder, pathlib.Path), folder  # installed as plain files, not zipped
    return folder


def load_module(model: str = "llm") -> types.ModuleType:
    """A fresh import of the model folder, as a new Triton stub process would do it."""
    folder = model_folder(model)
    sys.modules["triton_python_backend_utils"] = fake_pb_utils()
    if str(folder) not in sys.path:
        sys.path.append(str(folder))  # as the Python backend does
    for f in folder.glob("*.py"):  # modules of an earlier load hold the earlier fake
        sys.modules.pop(f.stem, None)
    spec = importlib.util.spec_from_file_location(f"llmesh_triton_{model}_model", folder / "model.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_llm(params: dict[str, str], **config: object) -> tuple[types.ModuleType, Any]:
    """(model.py's module, an initialized TritonPythonModel) with these config parameters."""
    mod = load_module("llm")
    m = mod.TritonPythonModel()
    model_config = {"parameters": {k: {"string_value": v} for k, v in params.items()}, **config}
    m.initialize({"model_config": json.dumps(model_config)})
    return mod, m


def run(model: Any, *inputs: dict[str, object], cancel_after: int | None = None) -> list[dict[str, Any]]:
    """Execute requests with these inputs and summarise each one's responses (see results)."""
    reqs = [FakeRequest(i, cancel_after) for i in inputs]
    model.execute(reqs)
    return results(reqs)


def results(reqs: list[FakeRequest]) -> list[dict[str, Any]]:
    """Wait for every request's FINAL response, then summarise each request's responses.

    A failed request: {"code", "field", "error"} from its error outputs; otherwise
    {"text", "finish", "completion_tokens", "chunks"}.
    """
    out: list[dict[str, Any]] = []
    for r in reqs:
        assert r.sender.done.wait(60), "no FINAL response"
        finals = [resp for resp, flags in r.sender.sent if flags & 1]
        assert len(finals) == 1  # exactly one FINAL response per request
        final = finals[0]
        assert final is None or final.error is None, "errors cross the boundary as outputs, not TritonError"
        if final is not None and "error_code" in final.outputs:
            assert set(final.outputs) == {"error_code", "error_field", "error_message"}
            out.append(
                {
                    "code": final.outputs["error_code"].decode(),
                    "field": final.outputs["error_field"].decode(),
                    "error": final.outputs["error_message"].decode(),
                }
            )
            continue
        text = "".join(resp.outputs["text"].decode() for resp, _ in r.sender.sent if resp is not None)
        out.append(
            {
                "text": text,
                "finish": final.outputs["finish_reason"].decode(),
                "completion_tokens": int(final.outputs["completion_tokens"]),
                "chunks": len(r.sender.sent),
            }
        )
    return out
