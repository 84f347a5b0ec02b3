"""Errors the server answers with, in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from typing import Any

INVALID_REQUEST = "invalid_request_error"


class APIError(Exception):
    """An HTTP error for the client; ``param`` names the request field at fault (``messages[0].content[1]``)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 error_type: str = INVALID_REQUEST) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI's API returns for an error."""
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


def invalid(param: str | None, message: str, code: str | None = None) -> APIError:
    """A 400 for a malformed or disallowed request field."""
    return APIError(400, message, param=param, code=code)


def server_error(message: str) -> APIError:
    """A 500: the request was valid but the server failed to answer it."""
    return APIError(500, message, code="internal_error", error_type="server_error")
