"""POST /v1/predictions, GET /v1/predictions/{id}, GET /v1/predictions/{id}/heatmap.

Thin: the prediction itself is ``app.services.predictions.PredictionService`` (shared with the
DICOM entry points). The endpoints are plain ``def`` functions: FastAPI runs them in its thread
pool, so DICOM decoding and inference never block the event loop. The upload limit is enforced by
``app.problems.UploadLimitMiddleware`` while the body streams in; an image part stays in memory up to
``Settings.upload_memory_bytes`` (16 MiB) and spools to a temporary file beyond it.
"""
from __future__ import annotations

import io
import logging
import uuid
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response

from app import storage
from app.api import predictions_service, problem_doc, service
from app.auth import Principal, authorise_filing_site, require
from app.fhir import FHIR_JSON, diagnostic_report
from app.problems import ApiProblem
from app.schemas import SITE_PATTERN, PredictionOut

log = logging.getLogger("cxr.api")
router = APIRouter(prefix="/v1/predictions", tags=["predictions"])


def _wants_fhir(request: Request) -> bool:
    return FHIR_JSON in request.headers.get("accept", "")


def _respond(request: Request, pred: dict[str, Any], status: int = 200):
    if _wants_fhir(request):
        return JSONResponse(diagnostic_report(pred), status_code=status, media_type=FHIR_JSON)
    body = PredictionOut(**{k: v for k, v in pred.items() if k in PredictionOut.model_fields})
    return JSONResponse(body.model_dump(mode="json"), status_code=status)


_RESPONSES = {200: {"model": PredictionOut, "content": {
    "application/json": {}, FHIR_JSON: {"schema": {"type": "object", "description": "FHIR R4 DiagnosticReport"}}}}}


@router.post("", response_model=PredictionOut, responses={**_RESPONSES, **problem_doc(400, 413, 422, 503)},
             summary="Predict COVID-19 from a chest radiograph (DICOM) and vitals")
def create_prediction(
    request: Request,
    image: Annotated[UploadFile, File(description="the DICOM file (CR/DX, frontal chest)")],
    vitals: Annotated[str | None, Form(description="JSON object with any of temperature_c, spo2_percent, "
                                       "heart_rate_bpm, respiratory_rate, systolic_bp_mmhg, age_years, sex",
                                       max_length=10_000)] = None,
    site: Annotated[str | None, Form(pattern=SITE_PATTERN, description="site code: one of the caller's sites "
                                     "(may be omitted by a single-site user)")] = None,
    accession: Annotated[str | None, Form(max_length=64, description="accession number; stored only as a "
                                          "keyed hash")] = None,
    principal: Principal = Depends(require("prediction.create")),
):
    from app.services.predictions import parse_vitals_text

    site = authorise_filing_site(principal, site)
    parsed = parse_vitals_text(vitals)
    served = predictions_service(request).predict(image.file, parsed, site=site, accession=accession,
                                                  actor=principal.name, role=principal.role)
    return _respond(request, served.record)


def load_visible(prediction_id: uuid.UUID | str, principal: Principal) -> dict[str, Any]:
    """The prediction if the caller may see it (their site, or admin); 404 otherwise — the same
    answer as for an id that does not exist, so other sites' predictions are not revealed."""
    pred = storage.get_prediction(str(prediction_id))
    if pred is None or not principal.may_see_site(pred.get("site")):
        raise ApiProblem(404, "prediction-not-found", f"no prediction with id {prediction_id}")
    return pred


@router.get("/{prediction_id}", response_model=PredictionOut, responses={**_RESPONSES, **problem_doc(404, 422)})
def get_prediction(request: Request, prediction_id: uuid.UUID,
                   principal: Principal = Depends(require("prediction.read"))):
    pred = load_visible(prediction_id, principal)
    pred["outcome"] = storage.current_outcome(pred["id"])
    return _respond(request, pred)


def _overlay_png(image: np.ndarray, cam: np.ndarray) -> bytes:
    from PIL import Image

    base = np.clip(image.reshape(image.shape[-2:]), 0, 1)
    cam = np.asarray(cam, dtype=np.float32)
    if cam.shape != base.shape:
        cam = np.asarray(Image.fromarray((np.clip(cam, 0, 1) * 255).astype(np.uint8)).resize(
            base.shape[::-1], Image.BILINEAR), dtype=np.float32) / 255.0
    cam = np.clip(np.nan_to_num(cam), 0, 1)
    # jet-like colour map without matplotlib
    r = np.clip(1.5 - np.abs(4 * cam - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * cam - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * cam - 1), 0, 1)
    heat = np.stack([r, g, b], axis=-1)
    alpha = (0.45 * cam)[..., None]
    rgb = (1 - alpha) * base[..., None] + alpha * heat
    buf = io.BytesIO()
    Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


@router.get("/{prediction_id}/heatmap", response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "Grad-CAM overlay (PNG)"},
                       **problem_doc(404, 410, 422)})
def get_heatmap(request: Request, prediction_id: uuid.UUID,
                principal: Principal = Depends(require("prediction.heatmap"))):
    pred = load_visible(prediction_id, principal)
    cached = predictions_service(request).input_cache.get(pred["id"])
    if cached is None:
        raise ApiProblem(410, "heatmap-inputs-gone",
                         "the image of this prediction is no longer held (inputs are kept in memory only, for "
                         "recent predictions of this server process; no image is stored at rest)")
    image, vitals = cached
    from app.services.champion import ChampionRefused

    try:
        lm = service(request).model_for_version(pred["model"]["version"])
    except ChampionRefused as exc:
        raise ApiProblem(503, "model-unavailable", f"the model version of this prediction cannot be loaded: "
                         f"it failed serving verification ({exc.reason})") from None
    cam = lm.gradcam(image, vitals)
    return Response(content=_overlay_png(image, cam), media_type="image/png",
                    headers={"X-Model-Version": lm.version, "Cache-Control": "no-store"})
