"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}}. No stack trace ever
reaches a client; unexpected exceptions are logged here and answered with a plain 500."""
from __future__ import annotations

import logging
import re
from typing import Optional

from litestar import Request, Response
from litestar.exceptions import HTTPException, NotFoundException, ValidationException

logger = logging.getLogger("jaxserve")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable", 500: "internal_server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def error_response(status: int, message: str, param=None, code=None, headers=None) -> Response:
    body = {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code if code is not None else status}}
    return Response(content=body, status_code=status, headers=headers or {}, media_type="application/json")


def _param_from(msg: str) -> Optional[str]:
    m = re.search(r"at `\$\.([A-Za-z_][\w]*)", msg) or re.search(r"SamplingParams\.(\w+)", msg)
    return m.group(1) if m else None


def handle_api_error(_: Request, exc: APIError) -> Response:
    return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)


def handle_validation(_: Request, exc: ValidationException) -> Response:
    extra = exc.extra if isinstance(exc.extra, list) else []
    detail = "; ".join(f"{e.get('message')}" + (f" (at {e.get('key')})" if e.get("key") else "")
                       for e in extra if isinstance(e, dict)) or str(exc.detail)
    param = next((e.get("key") for e in extra if isinstance(e, dict) and e.get("key")), None)
    return error_response(400, f"invalid request: {detail}", param)


def handle_http(_: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    msg = exc.detail if isinstance(exc.detail, str) else str(exc)
    if isinstance(exc, NotFoundException):
        msg = "not found"
    return error_response(status, msg, headers=getattr(exc, "headers", None))


def handle_unexpected(_: Request, exc: Exception) -> Response:
    logger.exception("unhandled error in a request", exc_info=exc)
    return error_response(500, "internal server error")


def value_error(exc: ValueError) -> APIError:
    msg = str(exc)
    return APIError(400, msg, _param_from(msg))


EXCEPTION_HANDLERS = {APIError: handle_api_error, ValidationException: handle_validation,
                      HTTPException: handle_http, Exception: handle_unexpected}
