"""Route modules of the hospital API, one per resource."""
from __future__ import annotations

from fastapi import Request

from app.services.champion import ModelService
from app.services.predictions import PredictionService

PROBLEM_RESPONSES = {
    401: {"description": "missing or invalid bearer token", "content": {"application/problem+json": {}}},
    403: {"description": "the token's role lacks the permission", "content": {"application/problem+json": {}}},
}


def problem_doc(*codes: int) -> dict:
    from app.schemas import Problem

    texts = {400: "bad request", 404: "not found", 409: "conflict", 410: "gone", 413: "upload too large",
             422: "refused input (image, vitals, validation)", 503: "no champion model loaded yet"}
    out = dict(PROBLEM_RESPONSES)
    for c in codes:
        out[c] = {"description": texts.get(c, "error"), "model": Problem,
                  "content": {"application/problem+json": {}}}
    return out


def service(request: Request) -> ModelService:
    return request.app.state.model_service


def predictions_service(request: Request) -> PredictionService:
    return request.app.state.predictions
