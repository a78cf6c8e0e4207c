"""Domain errors and the one table that maps them to gRPC status codes.

Servicers and domain code raise these; the exception interceptor turns them into
a status with rich details (google.rpc BadRequest / ErrorInfo / RetryInfo).
Anything else that escapes becomes INTERNAL with the request id, never a crash.
"""

from __future__ import annotations

import grpc

DOMAIN = "llmesh.ai"


class LlmeshError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, *, metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata or {}


class InvalidArgument(LlmeshError):
    """A request field is wrong; ``field`` is its path, e.g. ``sampling.top_p``."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}", metadata={"field": field})
        self.field = field
        self.description = description


class NotFound(LlmeshError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"{kind} '{name}' not found", metadata={"resource_type": kind, "resource_name": name})
        self.kind = kind
        self.name = name


class FailedPrecondition(LlmeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class PermissionDenied(LlmeshError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class Unauthenticated(LlmeshError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class RetryableError(LlmeshError):
    """Errors that carry a RetryInfo hint."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0, metadata: dict[str, str] | None = None) -> None:
        super().__init__(message, metadata=metadata)
        self.retry_after_s = retry_after_s


class Unavailable(RetryableError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class ResourceExhausted(RetryableError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(LlmeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class Cancelled(LlmeshError):
    code = grpc.StatusCode.CANCELLED
    reason = "CANCELLED"


class Unimplemented(LlmeshError):
    """An RPC of the contract that this service does not serve yet."""

    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "UNIMPLEMENTED"
