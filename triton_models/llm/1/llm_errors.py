"""Errors of one request, and how they cross the Triton boundary.

A failed request gets an ordinary FINAL response whose ``error_code`` / ``error_field`` /
``error_message`` output tensors say what went wrong (the other outputs are absent). Not a
TritonError: tritonclient's stream API hands those over as a bare message, and this Triton
release's Python backend cannot attach parameters to a response. The inference service maps
``error_code`` to its domain errors in one table (services/inference/llm_backend.py).
"""

from __future__ import annotations

# The codes the model sends (gRPC status names; the service decides the final status).
INVALID_ARGUMENT = "INVALID_ARGUMENT"  # error_field names the model input at fault
NOT_FOUND = "NOT_FOUND"  # error_field names the input whose value is not there ("adapter")
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"  # the queue is full: retry later
UNAVAILABLE = "UNAVAILABLE"  # the model is shutting down
INTERNAL = "INTERNAL"  # generation itself failed


class RequestError(Exception):
    """A problem with one request; turned into an error response for that request only."""

    def __init__(self, code: str, message: str, field: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


def invalid(field: str, why: str) -> RequestError:
    return RequestError(INVALID_ARGUMENT, why, field)


def not_found(field: str, name: str) -> RequestError:
    return RequestError(NOT_FOUND, f"{field} '{name}' not found", field)


def unavailable() -> RequestError:
    return RequestError(UNAVAILABLE, "llm model is shutting down")


def queue_full(limit: int) -> RequestError:
    return RequestError(RESOURCE_EXHAUSTED, f"llm queue is full ({limit} waiting)")


def internal(exc: Exception) -> RequestError:
    return RequestError(INTERNAL, str(exc) or "generation failed")
