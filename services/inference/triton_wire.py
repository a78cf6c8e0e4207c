"""Triton's gRPC inference messages, written and read without tritonclient's wrappers.

A streamed generation gets one response per text delta. tritonclient wraps each in an
InferResult whose ``as_numpy`` scans the outputs and builds a numpy array per call; on two
cores that per-token Python competes with the model for CPU. Here a request is built once
from raw little-endian bytes and a response is read with one pass over its outputs.
Wire format of the raw contents: BYTES elements are a uint32 length then the bytes;
numbers are little-endian fixed width; BOOL is one byte.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from tritonclient.grpc import service_pb2

InputValue = tuple[str, str, object]  # (name, Triton datatype, one scalar value)

_PACK = {"INT32": struct.Struct("<i"), "INT64": struct.Struct("<q"), "FP32": struct.Struct("<f")}
_INT32 = _PACK["INT32"]
_U32 = struct.Struct("<I")


def encode(dtype: str, value: object) -> bytes:
    """One scalar as Triton's raw input contents."""
    if dtype == "BYTES":
        data = value.encode("utf-8") if isinstance(value, str) else value
        if not isinstance(data, bytes):
            raise TypeError(f"a BYTES input takes str or bytes, not {type(value).__name__}")
        return _U32.pack(len(data)) + data
    if dtype == "BOOL":
        return b"\x01" if value else b"\x00"
    return _PACK[dtype].pack(value)  # struct checks the number


def infer_request(model: str, values: Sequence[InputValue], outputs: Sequence[str]) -> service_pb2.ModelInferRequest:
    """A ModelInferRequest of scalar inputs (shape [1, 1]: batch of one) and named outputs."""
    Tensor = service_pb2.ModelInferRequest.InferInputTensor
    Requested = service_pb2.ModelInferRequest.InferRequestedOutputTensor
    return service_pb2.ModelInferRequest(
        model_name=model,
        inputs=[Tensor(name=n, datatype=t, shape=[1, 1]) for n, t, _ in values],
        outputs=[Requested(name=n) for n in outputs],
        raw_input_contents=[encode(t, v) for _, t, v in values],
    )


def outputs(response: service_pb2.ModelInferResponse) -> dict[str, bytes]:
    """Output name → raw contents (Triton's gRPC frontend always fills raw_output_contents)."""
    return dict(zip([o.name for o in response.outputs], response.raw_output_contents, strict=False))


def string(raw: bytes | None) -> str | None:
    """The first element of a BYTES output, decoded; None when the output is absent."""
    if raw is None:
        return None
    if len(raw) < 4:
        return ""
    (n,) = _U32.unpack_from(raw)
    return raw[4 : 4 + n].decode("utf-8")


def int32(raw: bytes | None) -> int:
    """The first element of an INT32 output (0 when absent)."""
    return _INT32.unpack_from(raw)[0] if raw and len(raw) >= 4 else 0
