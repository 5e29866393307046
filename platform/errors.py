"""Typed errors that carry their HTTP status.

Services raise these; one Flask handler turns any of them into the JSON error body
``{"error": {"type", "message", "param"}}``. Messages say what failed, the value, what is
allowed and how to fix it. The ``type`` strings follow the OpenAI API's error types so OpenAI
clients map them to their own exception classes.
"""

from __future__ import annotations

from pydantic import BaseModel


class HydraError(Exception):
    status = 500
    type = "internal_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def to_dict(self) -> dict:
        return {"error": {"type": self.type, "message": self.message, "param": self.param}}


class InvalidRequest(HydraError):
    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(HydraError):
    status = 401
    type = "authentication_error"


class PermissionDenied(HydraError):
    status = 403
    type = "permission_error"


class NotFound(HydraError):
    status = 404
    type = "not_found_error"


class Conflict(HydraError):
    status = 409
    type = "conflict_error"


class UnsupportedMediaType(HydraError):
    status = 415
    type = "invalid_request_error"


class InvalidModel(HydraError):
    """The model URI was reachable as a request but its checkpoint cannot be served."""

    status = 422
    type = "invalid_model_error"


class RateLimited(HydraError):
    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, retry_after_s: int, param: str | None = None) -> None:
        super().__init__(message, param)
        self.retry_after_s = retry_after_s


class ServiceUnavailable(HydraError):
    status = 503
    type = "service_unavailable"


class ErrorDetail(BaseModel):
    """The ``error`` object of every error body (the schema /openapi.json documents)."""

    type: str
    message: str
    param: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail
