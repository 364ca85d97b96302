"""Bearer-token authentication, role-based authorisation and the per-request audit event.

Tokens come from governance (``compliance.users``: random, stored only as SHA-256, one role per
token). ``require("permission")`` is a FastAPI dependency: 401 (problem+json, ``WWW-Authenticate:
Bearer``) without a token or with an unknown/revoked/expired one — audited as
``auth.login_failed`` when a token was presented —, 403 when the token's role lacks the
permission — audited as ``auth.permission_denied``.

Every request under ``/v1`` is audited once as ``api.request`` (who, which route template, method,
status, result, duration) by ``RequestAuditMiddleware``; no PHI (no body, no query values, no
accession, no vitals). ``/healthz``, ``/readyz``, ``/metrics`` and the OpenAPI document are open
(probes and the Prometheus scraper carry no token) and not audited, to keep the trail meaningful.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

import anyio
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.problems import ApiProblem

log = logging.getLogger("cxr.api")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")

# permission -> roles that hold it (admin holds all)
PERMISSIONS: dict[str, frozenset[str]] = {
    "prediction.create": frozenset({"clinician", "admin"}),
    "prediction.read": frozenset({"clinician", "admin"}),
    "prediction.heatmap": frozenset({"clinician", "admin"}),
    "outcome.record": frozenset({"clinician", "admin"}),
    "vitals.put": frozenset({"clinician", "admin"}),
    "dicomweb.store": frozenset({"clinician", "admin"}),
    "model.read": frozenset({"clinician", "researcher", "admin"}),
    "audit.verify": frozenset({"compliance_officer", "admin"}),
    "audit.report": frozenset({"compliance_officer", "admin"}),
}

_bearer = HTTPBearer(auto_error=False, description="API token issued by `cxr tokens issue`")


@dataclass(frozen=True)
class Principal:
    name: str
    role: str


def _route_template(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def _audit(action: str, *, actor: str, role: str, subject: str, details: dict) -> None:
    from compliance.audit import record_event

    record_event(action, actor=actor, role=role, subject=subject, details=details)


def require(permission: str):
    roles = PERMISSIONS[permission]

    def dependency(request: Request,
                   credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Principal:
        route = _route_template(request)
        if credentials is None or not credentials.credentials:
            raise ApiProblem(401, "unauthorized", "a bearer token is required (Authorization: Bearer <token>)",
                             headers={"WWW-Authenticate": "Bearer"})
        from compliance.users import user_for_token

        user = user_for_token(credentials.credentials)
        if user is None:
            _audit("auth.login_failed", actor="anonymous", role="unknown", subject=f"api:{route}",
                   details={"reason": "invalid-token", "method": request.method, "route": route})
            raise ApiProblem(401, "invalid-token", "the bearer token is unknown, revoked or expired",
                             headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        principal = Principal(user.name, user.role)
        request.state.principal = principal
        if user.role not in roles:
            _audit("auth.permission_denied", actor=user.name, role=user.role, subject=f"api:{route}",
                   details={"permission": permission, "required_roles": sorted(roles), "method": request.method,
                            "route": route})
            raise ApiProblem(403, "forbidden",
                             f"role {user.role!r} may not {permission} (needs {' or '.join(sorted(roles))})")
        return principal

    return dependency


def _result(status: int) -> str:
    if status < 400:
        return "ok"
    if status in (401, 403):
        return "denied"
    return "client-error" if status < 500 else "server-error"


class RequestAuditMiddleware:
    """Times every request for the metrics and writes one ``api.request`` audit event per /v1 call."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            seconds = time.perf_counter() - t0
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "")
            code = status["code"]
            try:
                from app import metrics

                metrics.observe_request(route, method, code, seconds)
            except Exception:  # metrics must never fail a request
                log.warning("metrics: observe_request failed", exc_info=False)
            if scope.get("path", "").startswith("/v1"):
                principal = scope.get("state", {}).get("principal")
                details = {"method": method, "route": route, "status": code, "result": _result(code),
                           "ms": round(seconds * 1000, 1)}
                pid = str(scope.get("path_params", {}).get("prediction_id") or "")
                if pid and _UUID.match(pid):
                    details["prediction_id"] = str(pid)[:64]
                try:
                    await anyio.to_thread.run_sync(lambda: _audit(
                        "api.request", actor=principal.name if principal else "anonymous",
                        role=principal.role if principal else "unknown", subject=f"{method} {route}",
                        details=details))
                except Exception:
                    log.error("audit: api.request could not be written (%s)", route)
