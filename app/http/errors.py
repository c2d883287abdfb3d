"""Errors a client can get, in OpenAI's shape: ``{"error": {"type", "message", "param", "code"}}``.

Owns the mapping from a failure to its HTTP status and error type. Every
message names the field or limit involved and what to do about it.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        error_type: str,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.param = param
        self.code = code
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "type": self.error_type,
            "message": self.message,
            "param": self.param,
            "code": self.code or self.error_type,
        }
        error.update(self.extra)
        return {"error": error}


def invalid_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, "invalid_request_error", message, param=param)


def model_not_found(model: str, known: list[str]) -> ApiError:
    listed = ", ".join(sorted(known)[:20])
    return ApiError(
        404,
        "invalid_request_error",
        f"The model {model!r} is not served by any configured upstream. Known models: {listed}",
        param="model",
        code="model_not_found",
    )


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "authentication_error", message, code="invalid_api_key")


def forbidden(message: str, param: str | None = None) -> ApiError:
    return ApiError(403, "permission_error", message, param=param)


def upstream_error(message: str) -> ApiError:
    return ApiError(502, "upstream_error", message)


def upstream_timeout(message: str) -> ApiError:
    return ApiError(504, "upstream_timeout", message)
