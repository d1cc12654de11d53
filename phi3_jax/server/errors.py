"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, with the status
OpenAI's API (and so its clients) use for each kind."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

# status -> OpenAI's error type for it
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
          503: "service_unavailable"}


class APIError(Exception):
    """A request the server answers with an error. `param` names the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


def unsupported(param: str, why: str = "") -> APIError:
    return APIError(400, f"{param} is not supported by this server{why}", param,
                    "unsupported_parameter")
