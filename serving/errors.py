"""Errors in OpenAI's shape, and the handlers that make every failure one (bad input never yields a 500).

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

    status  type                    code (examples)
    400     invalid_request_error   null, context_length_exceeded, invalid_json, unknown_expert,
                                    invalid_structured_output
    401     invalid_request_error   invalid_api_key
    404     invalid_request_error   model_not_found, not_found, unknown_id, feedback_disabled
    405     invalid_request_error   method_not_allowed
    409     invalid_request_error   duplicate_feedback
    413     invalid_request_error   request_too_large
    429     rate_limit_error        queue_full
    500     server_error            internal_error, backend_error (a bug or a device error; the message
                                    carries an error id to find the traceback in the server's log, never the
                                    exception's own text)
    503     server_error            server_shutting_down (draining: retry elsewhere), engine_unavailable
    504     server_error            request_timeout (the server-side deadline passed)
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.schemas import INVALID_TEXT

log = logging.getLogger(__name__)

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
         404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
         415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
         500: "server_error", 503: "server_error", 504: "server_error"}
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


class APIError(Exception):
    """An error answered to the client as-is."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.param, err.code), status_code=err.status,
                        headers=err.headers)


_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _loc_param(loc: tuple[Any, ...]) -> str | None:
    """('body', 'routing', 'weights', 'math') -> 'routing.weights.math'; drops pydantic's union member tags
    (('body', 'stop', 'list[str]', 0) -> 'stop.0')."""
    parts = [str(p) for p in loc[1:]
             if not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p or "-" in p))]
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError) -> APIError:
    """The first validation problem as a 400 naming its field (malformed JSON has its own message)."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "value_error"}
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return APIError(400, f"The request body is not valid JSON: {ctx.get('error', first.get('msg'))}",
                        code="invalid_json")
    loc = tuple(first.get("loc", ()))
    param = _loc_param(loc)
    if first.get("type") == INVALID_TEXT:  # raised on the whole body; the field is in its context
        param = (first.get("ctx") or {}).get("param")
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "missing":
        msg = f"'{param}' is a required property"
    elif first.get("type") in ("model_type", "dict_type") and param is None:
        msg = "The request body must be a JSON object"
    elif param:
        msg = f"Invalid value for '{param}': {msg}"
    return APIError(400, msg, param=param)


def install(app: FastAPI) -> None:
    """Register the handlers: APIError, validation errors, HTTP errors (404/405/...), anything else (500)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(json.JSONDecodeError)
    async def _bad_json(request: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return error_response(APIError(400, f"The request body is not valid JSON: {exc.msg}", code="invalid_json"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        if exc.status_code == 404:
            message = f"No route {request.method} {request.url.path}"
        return error_response(APIError(exc.status_code, message, code=HTTP_CODES.get(exc.status_code),
                                       headers=getattr(exc, "headers", None)))



def internal_error(where: str, exc: BaseException | None = None) -> APIError:
    """A 500 for a bug: logged with its traceback under an error id; the client gets the id, not the text.
    `exc` defaults to the exception being handled."""
    eid = uuid.uuid4().hex[:12]
    log.error("internal error %s in %s", eid, where, exc_info=exc or True)
    return APIError(500, f"The server had an error while processing the request (error id {eid}).",
                    code="internal_error")


class CatchAll:
    """Innermost ASGI middleware: an exception no handler took becomes a 500 in OpenAI's shape (logged, counted
    by the outer StatusCounter, connection kept alive), or, once a response has started, ends it quietly."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(msg: dict[str, Any]) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, receive, watch)
        except Exception:  # noqa: BLE001 - the last line of defence: no bug answers a plain-text 500
            err = internal_error(f"{scope.get('method')} {scope.get('path')}")
            if started:
                return
            resp = error_response(err)
            await resp(scope, receive, send)
