"""Bearer-token authentication, role-based authorisation and the per-request audit event.

Tokens come from governance (``compliance.users``: random, stored only as SHA-256, one role per
token). ``require("permission")`` is a FastAPI dependency: 401 (problem+json, ``WWW-Authenticate:
Bearer``) without a token or with an unknown/revoked/expired one — audited as
``auth.login_failed`` when a token was presented —, 403 when the token's role lacks the
permission — audited as ``auth.permission_denied``.

``AuthGateMiddleware`` authenticates every ``/v1`` request from its ``Authorization`` header *before*
any route reads the body: an unauthenticated upload is answered 401 without being read, spooled or
parsed. Failed authentication (no token, unknown/revoked/expired token) is rate limited per client
address (token bucket: ``auth_fail_burst`` failures, refilled at ``auth_fail_per_minute``): past
it the client gets 429 problem+json with ``Retry-After``, without a database lookup or an audit
write; each time a client is throttled, one ``auth.rate_limited`` audit entry is written (with the
number of attempts suppressed since the previous one). Invalid tokens within the budget are
audited individually (``auth.login_failed``); a missing token is not (the aggregate entry counts it).
Every ``/v1`` response carries ``Cache-Control: no-store`` (patient data must not sit in browser
or proxy caches).

Object level: a clinician's token carries the user's sites (``compliance.users.sites_of``). A
clinician files predictions only for those sites (403 otherwise) and reads, fetches heatmaps of and
records outcomes for only those sites' predictions (404 otherwise, so the existence of other sites'
predictions is not revealed). An admin may act on every configured site. ``site`` must be a
configured site (some user works there): free text never becomes a stored site or a metric label.

Every authenticated request under ``/v1`` is audited once as ``api.request`` (who, which route template, method,
status, result, duration) by ``RequestAuditMiddleware``; no PHI (no body, no query values, no
accession, no vitals). ``/healthz``, ``/readyz``, ``/metrics`` and the OpenAPI document are open
(probes and the Prometheus scraper carry no token) and not audited, to keep the trail meaningful.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
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
    sites: tuple[str, ...] = ()

    @property
    def all_sites(self) -> bool:
        return self.role == "admin"

    def may_see_site(self, site: str | None) -> bool:
        return self.all_sites or (site is not None and site in self.sites)


def principal_for_token(token: str | None) -> Principal | None:
    """The principal of an active token (with the user's sites), else None. Blocking (database)."""
    from compliance.users import sites_of, user_for_token

    user = user_for_token(token)
    if user is None:
        return None
    return Principal(user.name, user.role, tuple(sites_of(user.name)))


def _configured_sites() -> set[str]:
    from compliance.users import configured_sites

    return configured_sites()


def authorise_filing_site(principal: Principal, site: str | None) -> str:
    """The site a new prediction is filed under, or ``ApiProblem`` (403 not one of the caller's
    sites, 422 missing / not configured)."""
    if principal.all_sites:
        known = _configured_sites()
        if site is None:
            if len(known) == 1:
                return next(iter(known))
            raise ApiProblem(422, "site-required", "field 'site' is required (a configured site code)", field="site")
        if site not in known:
            raise ApiProblem(422, "unknown-site", "site is not a configured site (`cxr users sites`): predictions "
                             "and metrics carry configured sites only", field="site")
        return site
    if not principal.sites:
        raise ApiProblem(403, "no-site", f"user {principal.name!r} works for no site: an admin assigns sites with "
                         "`cxr users sites`")
    if site is None:
        if len(principal.sites) == 1:
            return principal.sites[0]
        raise ApiProblem(422, "site-required", "field 'site' is required: you work for several sites "
                         f"({', '.join(principal.sites)})", field="site")
    if site not in principal.sites:
        raise ApiProblem(403, "site-forbidden", f"you may file predictions only for your sites "
                         f"({', '.join(principal.sites)})", field="site")
    return site


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
        principal = getattr(request.state, "principal", None)  # set by AuthGateMiddleware
        if principal is None:
            if credentials is None or not credentials.credentials:
                raise ApiProblem(401, "unauthorized", "a bearer token is required (Authorization: Bearer <token>)",
                                 headers={"WWW-Authenticate": "Bearer"})
            principal = principal_for_token(credentials.credentials)
            if principal is None:
                _audit("auth.login_failed", actor="anonymous", role="unknown", subject=f"api:{route}",
                       details={"reason": "invalid-token", "method": request.method, "route": route})
                raise ApiProblem(401, "invalid-token", "the bearer token is unknown, revoked or expired",
                                 headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
            request.state.principal = principal
        user = principal
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
            principal = scope.get("state", {}).get("principal")
            if scope.get("path", "").startswith("/v1") and (principal is not None or code not in (401, 429)):
                # unauthenticated 401/429 are not audited one by one (AuthGateMiddleware aggregates them)
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


# --------------------------------------------------------------------------- authentication gate
class FailedAuthLimiter:
    """Token bucket per client address for *failed* authentication. ``allow(client)`` spends one unit
    and says whether the failure may be processed (looked up, audited) or must be answered 429."""

    def __init__(self, burst: int, per_minute: float, max_clients: int = 10_000) -> None:
        self.burst, self.rate = float(burst), float(per_minute) / 60.0
        self.max_clients = max_clients
        self._state: "OrderedDict[str, list[float]]" = OrderedDict()  # client -> [tokens, t, suppressed]
        self._lock = threading.Lock()

    def _bucket(self, client: str, now: float) -> list[float]:
        b = self._state.get(client)
        if b is None:
            b = [self.burst, now, 0.0]
            self._state[client] = b
            while len(self._state) > self.max_clients:
                self._state.popitem(last=False)
        else:
            self._state.move_to_end(client)
            b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
            b[1] = now
        return b

    def check(self, client: str) -> tuple[bool, int, float]:
        """(allowed, n, seconds until the next unit). Refused: n = attempts refused in this episode
        (1 = the client was just throttled). Allowed: n = attempts refused in the episode that just
        ended (0 when there was none)."""
        now = time.monotonic()
        with self._lock:
            b = self._bucket(client, now)
            if b[0] >= 1.0:
                b[0] -= 1.0
                ended, b[2] = int(b[2]), 0.0
                return True, ended, 0.0
            b[2] += 1
            return False, int(b[2]), (1.0 - b[0]) / self.rate if self.rate > 0 else 60.0


NO_STORE = [(b"cache-control", b"no-store"), (b"pragma", b"no-cache")]


def _bearer_token(scope: Scope) -> str | None:
    for k, v in scope.get("headers", []):
        if k == b"authorization":
            text = v.decode("latin-1").strip()
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


class AuthGateMiddleware:
    """Authenticate ``/v1`` requests from the header alone, before the body is read (see module doc);
    add ``Cache-Control: no-store`` to every ``/v1`` response."""

    def __init__(self, app: ASGIApp, burst: int = 20, per_minute: float = 10.0) -> None:
        self.app = app
        self.limiter = FailedAuthLimiter(burst, per_minute)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v1"):
            return await self.app(scope, receive, send)

        async def send_no_store(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in (b"cache-control", b"pragma")]
                message = {**message, "headers": headers + NO_STORE}
            await send(message)

        token = _bearer_token(scope)
        principal = None
        if token is not None and len(token) <= 512:
            principal = await anyio.to_thread.run_sync(principal_for_token, token)
        if principal is not None:
            scope.setdefault("state", {})["principal"] = principal
            return await self.app(scope, receive, send_no_store)
        await self._refuse(scope, receive, send_no_store, presented=token is not None)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, *, presented: bool) -> None:
        from app.problems import problem_response

        client = (scope.get("client") or ("unknown", 0))[0] or "unknown"
        method, path = scope.get("method", ""), scope.get("path", "")
        allowed, n, retry = self.limiter.check(client)
        if allowed and n:  # a throttling episode ended: how many attempts went unaudited
            await anyio.to_thread.run_sync(lambda: _audit(
                "auth.rate_limit_ended", actor="anonymous", role="unknown", subject=f"client:{client}",
                details={"client": client, "refused_429": n}))
        if not allowed:
            if n == 1:  # the moment this client is throttled: one aggregated entry
                await anyio.to_thread.run_sync(lambda: self._audit_limited(client))
            resp = problem_response(429, "too-many-failed-authentications",
                                    "too many requests without a valid bearer token from this client; retry later",
                                    instance=path, headers={"Retry-After": str(max(1, int(retry + 0.999)))})
        elif presented:
            await anyio.to_thread.run_sync(lambda: _audit(
                "auth.login_failed", actor="anonymous", role="unknown", subject=f"api:{path[:120]}",
                details={"reason": "invalid-token", "method": method, "client": client}))
            resp = problem_response(401, "invalid-token", "the bearer token is unknown, revoked or expired",
                                    instance=path, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        else:
            resp = problem_response(401, "unauthorized", "a bearer token is required (Authorization: Bearer <token>)",
                                    instance=path, headers={"WWW-Authenticate": "Bearer"})
        # answer without reading the body; close the connection so an unread upload is not drained
        resp.headers["connection"] = "close"
        await resp(scope, receive, send)

    def _audit_limited(self, client: str) -> None:
        _audit("auth.rate_limited", actor="anonymous", role="unknown", subject=f"client:{client}",
               details={"client": client, "burst": int(self.limiter.burst),
                        "per_minute": round(self.limiter.rate * 60, 3),
                        "note": "further failed authentications from this client are answered 429 and not "
                                "audited one by one until its budget refills"})
