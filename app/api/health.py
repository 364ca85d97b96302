"""Liveness, readiness and Prometheus metrics (no token: probes and scrapers carry none)."""
from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.problems import problem_response
from app.schemas import Health, Problem, Ready

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Ready,
            responses={503: {"model": Problem, "description": "no champion loaded yet",
                             "content": {"application/problem+json": {}}}})
def readyz(request: Request):
    lm = request.app.state.model_service.current()
    if lm is None:
        return problem_response(503, "not-ready", "no champion model is loaded yet", instance="/readyz",
                                headers={"Retry-After": "2"})
    return Ready(ready=True, model_version=lm.version)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
def metrics() -> Response:
    from app.metrics import metrics_payload

    body, ctype = metrics_payload()
    return Response(content=body, media_type=ctype)
