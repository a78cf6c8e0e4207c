"""Responses on a request's response sender: stream chunks, the FINAL answer, errors.

Every request gets exactly one FINAL response; `row.finalized` guards that.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from llm_constraints import verdict
from llm_errors import RequestError
from llm_request import Row

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _string(name: str, value: str) -> Any:
    return pb_utils.Tensor(name, np.array([[value.encode("utf-8")]], dtype=np.object_))


def _int32(name: str, value: int) -> Any:
    return pb_utils.Tensor(name, np.array([[value]], dtype=np.int32))


def _response(text: str, row: Row, finish: str) -> Any:
    outputs = [
        _string("text", text),
        _int32("prompt_tokens", len(row.prompt_ids)),
        _int32("completion_tokens", len(row.generated)),
        _string("finish_reason", finish),
    ]
    if finish and row.structured:  # a constrained request's verdict rides on its FINAL
        outputs.append(_string("structured_json", row.structured))
    return pb_utils.InferenceResponse(output_tensors=outputs)


# Each response is a synchronous round trip from the decode thread to the Triton server,
# then one gRPC message per hop to the client: when tokens come faster than this interval
# (a small model, a full batch) a row's delta carries several tokens. Set from the model
# parameter stream_interval_ms; 0 streams every token.
_stream_interval_s = 0.0


def pace_streams(interval_ms: float) -> None:
    """At most one delta per row every ``interval_ms`` (the first is never held)."""
    global _stream_interval_s
    _stream_interval_s = max(0.0, interval_ms) / 1000.0


def send_delta(row: Row, delta: str) -> None:
    """A streamed text delta (not FINAL), or nothing yet while the row is within its
    stream interval: row.emitted grows only when a delta is sent, so the next delta
    (update_text's text past row.emitted) or the FINAL carries the held text."""
    now = time.monotonic()
    if row.emitted and now - row.delta_at < _stream_interval_s:
        return
    try:
        row.sender.send(_response(delta, row, ""))
        row.emitted += delta
        row.delta_at = now
    except Exception as exc:
        pb_utils.Logger.log_warn(f"llm: could not stream: {exc}")


def send_final(row: Row) -> None:
    """FINAL response: the rest of a stream, or the whole text of a unary request."""
    if row.finalized:
        return
    row.finalized = True
    if row.response_format is not None and not row.structured:  # choice rows come scored
        row.structured = verdict(row.finish, row.constraint)
    try:
        if row.finish == "cancelled":
            try:
                rest = row.text[len(row.emitted) :] if row.stream else row.text
                row.sender.send(_response(rest, row, "cancelled"), flags=FINAL)
            except Exception:
                row.sender.send(flags=FINAL)
        elif row.stream:
            rest = row.text[len(row.emitted) :]
            row.sender.send(_response(rest, row, row.finish or "stop"), flags=FINAL)
        else:
            row.sender.send(_response(row.text, row, row.finish or "stop"), flags=FINAL)
    except Exception as exc:
        pb_utils.Logger.log_warn(f"llm: could not send final response: {exc}")


def send_error(row: Row, err: RequestError) -> None:
    """FINAL response carrying only the error outputs (see llm_errors)."""
    if row.finalized:
        return
    row.finalized = True
    row.finish = "error"
    response = pb_utils.InferenceResponse(
        output_tensors=[
            _string("error_code", err.code),
            _string("error_field", err.field),
            _string("error_message", err.message),
        ]
    )
    try:
        row.sender.send(response, flags=FINAL)
    except Exception as exc:
        pb_utils.Logger.log_warn(f"llm: could not send error response: {exc}")


def fail(rows: list[Row], err: RequestError) -> None:
    for r in rows:
        send_error(r, err)
