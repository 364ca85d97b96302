"""RFC 9457 problem details (``application/problem+json``) for every error the API returns.

Covers: FastAPI/pydantic validation errors (422), malformed JSON (422), unknown routes (404),
wrong method (405), oversized uploads (413, enforced while the body streams in), every
``ImageRefused`` code from the data layer with its reason (422), every ``VitalsError`` with the
field and its valid range (422), auth (401/403), conflicts (409) and a catch-all that logs the
failure without PHI (exception class and code location only, never its message or the request
body) and answers a generic 500 — reserved for real bugs.
"""
from __future__ import annotations

import logging
import traceback
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("cxr.api")

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://covid-cxr.example.org/problems/"

_TITLES = {
    400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found", 405: "Method not allowed",
    406: "Not acceptable", 409: "Conflict", 410: "Gone", 413: "Content too large", 415: "Unsupported media type",
    422: "Unprocessable content", 429: "Too many requests", 500: "Internal server error",
    503: "Service unavailable",
}


class ApiProblem(Exception):
    """Raise from route code to answer with a problem document."""

    def __init__(self, status: int, code: str, detail: str, *, title: str | None = None,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.title = title or _TITLES.get(status, "Error")
        self.headers = headers
        self.extra = extra


def problem_response(status: int, code: str, detail: str, *, title: str | None = None,
                     instance: str | None = None, headers: dict[str, str] | None = None,
                     **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"type": TYPE_BASE + code, "title": title or _TITLES.get(status, "Error"),
                            "status": status, "detail": detail, "code": code}
    if instance:
        body["instance"] = instance
    body.update({k: v for k, v in extra.items() if v is not None})
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"request body exceeds the upload limit of {limit} bytes")


class UploadLimitMiddleware:
    """Refuse bodies over ``max_bytes``: at once from Content-Length, else while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    declared = -1
                if declared > limit:
                    resp = problem_response(413, "upload-too-large",
                                            f"the request body ({declared} bytes) exceeds the upload limit of "
                                            f"{limit} bytes", limit_bytes=limit)
                    # drain nothing: answer immediately and close
                    resp.headers["connection"] = "close"
                    return await resp(scope, receive, send)
        total = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            resp = problem_response(413, "upload-too-large",
                                    f"the request body exceeds the upload limit of {limit} bytes", limit_bytes=limit)
            await resp(scope, receive, send)


def _log_bug(request: Request, exc: BaseException) -> str:
    """Log an unexpected exception without PHI: class + code locations, never message or input."""
    incident = uuid.uuid4().hex[:12]
    frames = traceback.extract_tb(exc.__traceback__)
    where = " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}:{f.name}" for f in reversed(frames[-8:]))
    route = getattr(request.scope.get("route"), "path", "unmatched")
    log.error("unhandled %s on %s %s (incident %s) at %s", type(exc).__name__, request.method, route, incident, where)
    return incident


def install_problem_handlers(app: FastAPI) -> None:
    from models.preprocessing import ImageRefused, VitalsError  # the data layer's refusals

    @app.exception_handler(ApiProblem)
    async def _api_problem(request: Request, exc: ApiProblem):
        return problem_response(exc.status, exc.code, exc.detail, title=exc.title, headers=exc.headers,
                                instance=request.url.path, **exc.extra)

    @app.exception_handler(ImageRefused)
    async def _image_refused(request: Request, exc: ImageRefused):
        code = getattr(exc, "code", "image-refused") or "image-refused"
        reason = getattr(exc, "reason", None) or str(exc)
        return problem_response(422, f"image-refused/{code}", reason, title="Image refused",
                                instance=request.url.path, refusal_code=code)

    @app.exception_handler(VitalsError)
    async def _vitals_error(request: Request, exc: VitalsError):
        field = getattr(exc, "field", None)
        valid = getattr(exc, "valid_range", None)
        reason = getattr(exc, "reason", None) or str(exc)
        return problem_response(422, "invalid-vitals", reason, title="Invalid vitals", instance=request.url.path,
                                field=field, value=_jsonable(getattr(exc, "value", None)),
                                valid_range=_jsonable(valid))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = []
        for e in exc.errors():
            loc = [str(x) for x in e.get("loc", ())]
            # never echo the input back (it may hold PHI): location, message and type only
            errors.append({"loc": loc, "msg": e.get("msg", ""), "type": e.get("type", "")})
        malformed = any(e["type"] == "json_invalid" for e in errors)
        if malformed:
            return problem_response(422, "malformed-json", "the request body is not valid JSON",
                                    title="Malformed JSON", instance=request.url.path, errors=errors)
        fields = ", ".join(".".join(e["loc"]) + ": " + e["msg"] for e in errors[:5])
        return problem_response(422, "validation-error", f"request validation failed: {fields}",
                                title="Request validation failed", instance=request.url.path, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        status = exc.status_code
        code = {404: "not-found", 405: "method-not-allowed", 413: "upload-too-large", 401: "unauthorized",
                403: "forbidden", 400: "bad-request"}.get(status, f"http-{status}")
        detail = exc.detail if isinstance(exc.detail, str) else _TITLES.get(status, "error")
        if status == 404 and detail == "Not Found":
            detail = f"no resource at {request.url.path}"
        if status == 405:
            detail = f"method {request.method} is not allowed on {request.url.path}"
        if status == 400 and "parsing the body" in detail:
            detail = "the request body could not be parsed (expected multipart/form-data or JSON as documented)"
        return problem_response(status, code, detail, instance=request.url.path,
                                headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        incident = _log_bug(request, exc)
        return problem_response(500, "internal-error",
                                f"an internal error occurred (incident {incident}); it has been logged",
                                instance=request.url.path, incident=incident)
