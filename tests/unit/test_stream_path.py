"""The streaming path's per-token economy: Triton's wire format read and written without
tritonclient's wrappers, and the llm model's stream pacing (stream_interval_ms)."""

from __future__ import annotations

import os
import pathlib
import struct

import numpy as np
import pytest
from tritonclient.grpc import InferResult, service_pb2

from llmesh.services.inference import triton_wire as wire
from llmesh.services.inference.llm_backend import GenerationInput, build_inputs, chunk_of, input_values, model_error_of
from llmesh.services.inference.sampling import Sampling

pytest.importorskip("torch")
from llmesh.demo.models import build_llm
from tests.support.triton_llm import load_llm, run


def _response(**outputs: tuple[str, bytes]) -> service_pb2.ModelInferResponse:
    r = service_pb2.ModelInferResponse(model_name="llm")
    for name, (dtype, raw) in outputs.items():
        r.outputs.add(name=name, datatype=dtype, shape=[1, 1])
        r.raw_output_contents.append(raw)
    return r


def _bytes(s: str) -> bytes:
    return struct.pack("<I", len(s.encode())) + s.encode()


def test_request_bytes_match_tritonclient() -> None:
    inp = GenerationInput(Sampling(max_tokens=7, temperature=0.5, seed=3, stop=("。",)), prompt="如何重置密码?")
    req = wire.infer_request("llm", input_values(inp, True), ["text"])
    theirs = build_inputs(inp, True)
    assert [t.name for t in req.inputs] == [t.name() for t in theirs]
    assert [t.datatype for t in req.inputs] == [t.datatype() for t in theirs]
    assert list(req.raw_input_contents) == [t._get_content() for t in theirs]  # the bytes tritonclient sends


def test_a_response_reads_as_tritonclient_reads_it() -> None:
    r = _response(
        text=("BYTES", _bytes("重置 it")),
        prompt_tokens=("INT32", struct.pack("<i", 12)),
        completion_tokens=("INT32", struct.pack("<i", 5)),
        finish_reason=("BYTES", _bytes("length")),
        structured_json=("BYTES", _bytes('{"valid": false}')),
    )
    c = chunk_of(wire.outputs(r))
    ref = InferResult(r)
    assert c is not None and model_error_of(wire.outputs(r)) is None
    assert c.text == ref.as_numpy("text").reshape(-1)[0].decode() == "重置 it"
    assert c.prompt_tokens == int(np.asarray(ref.as_numpy("prompt_tokens")).reshape(-1)[0]) == 12
    assert (c.completion_tokens, c.finish_reason, c.structured) == (5, "length", '{"valid": false}')
    failed = _response(error_code=("BYTES", _bytes("NOT_FOUND")), error_field=("BYTES", _bytes("adapter")))
    e = model_error_of(wire.outputs(failed))
    assert e is not None and (e.code, e.field, e.message) == ("NOT_FOUND", "adapter", "")
    assert chunk_of(wire.outputs(service_pb2.ModelInferResponse())) is None  # a flags-only final


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("lm") / "tiny-qwen2"
    build_llm(folder)
    return folder


@pytest.mark.parametrize("interval_ms", ["0", "60000"])
def test_paced_streams_carry_the_same_text(tiny_lm: pathlib.Path, interval_ms: str) -> None:
    os.environ["LLMESH_HOME"] = str(tiny_lm.parent)
    _, m = load_llm(
        {"model_path": str(tiny_lm), "adapter_dir": str(tiny_lm.parent / "adapters"), "stream_interval_ms": interval_ms}
    )
    try:
        req = {"prompt": "hello there", "max_tokens": 24, "temperature": 0.0}
        unary = run(m, req)[0]
        streamed = run(m, {**req, "stream": True})[0]
        assert streamed["text"] == unary["text"] and streamed["completion_tokens"] == unary["completion_tokens"]
        if interval_ms == "0":
            assert streamed["chunks"] > 2  # a delta per token (or per complete character)
        else:  # the first delta at once, everything after it held for the FINAL
            assert streamed["chunks"] <= 2
    finally:
        m.finalize()
