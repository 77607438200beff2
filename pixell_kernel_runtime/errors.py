"""Errors that carry an HTTP status and a stable machine code.

Every layer raises these; the HTTP layer turns them into the contract's
``{error, message, code}`` envelope in one place.
"""

from __future__ import annotations

from typing import Any


class RuntimeAPIError(Exception):
    """An error that maps to one HTTP answer."""

    status: int = 400
    kind: str = "BadRequest"
    code: str = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        kind: str | None = None,
        code: str | None = None,
        details: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if kind is not None:
            self.kind = kind
        if code is not None:
            self.code = code
        self.details = details


class PackageError(RuntimeAPIError):
    """A package was refused: bad archive, bad manifest, digest mismatch."""

    status = 400
    kind = "PackageError"
    code = "invalid_package"


class NotFound(RuntimeAPIError):
    status = 404
    kind = "NotFound"
    code = "not_found"


class Conflict(RuntimeAPIError):
    status = 409
    kind = "Conflict"
    code = "conflict"


class TooManyRequests(RuntimeAPIError):
    status = 429
    kind = "TooManyRequests"
    code = "queue_full"

    def __init__(self, message: str, *, code: str | None = None, retry_after: int = 1) -> None:
        super().__init__(message, code=code)
        # Seconds, for the Retry-After header.
        self.retry_after = retry_after


class ValidationFailed(RuntimeAPIError):
    """A request body that does not match its schema (the contract's 422)."""

    status = 422
    kind = "ValidationError"
    code = "validation_error"

    def __init__(self, details: list[dict[str, Any]]) -> None:
        super().__init__("Invalid request data", details=details)


class ServiceUnavailable(RuntimeAPIError):
    status = 503
    kind = "ServiceUnavailable"
    code = "unavailable"
