"""POST /v1/predictions, GET /v1/predictions/{id}, GET /v1/predictions/{id}/heatmap.

The endpoints are plain ``def`` functions: FastAPI runs them in its thread pool, so DICOM decoding
and inference never block the event loop. The upload limit is enforced by
``app.problems.UploadLimitMiddleware`` while the body streams in (multipart file parts spool to a
temporary file beyond 1 MiB, so the upload is not held in memory twice).
"""
from __future__ import annotations

import io
import json
import logging
import threading
import uuid
from collections import OrderedDict
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response

from app import storage
from app.api import problem_doc, service
from app.auth import Principal, require
from app.fhir import FHIR_JSON, diagnostic_report
from app.problems import ApiProblem
from app.schemas import SITE_PATTERN, PredictionOut

log = logging.getLogger("cxr.api")
router = APIRouter(prefix="/v1/predictions", tags=["predictions"])

VITAL_FIELDS = ("temperature_c", "spo2_percent", "heart_rate_bpm", "respiratory_rate", "systolic_bp_mmhg",
                "age_years")
LOW_CONTRAST_STD = 0.02  # std of the prepared image in [0, 1]; a real radiograph is ~0.1-0.3
LOW_RANGE = 0.08  # 1st-99th percentile spread


class InputCache:
    """Prepared image + parsed vitals of recent predictions, in memory only (for the heatmap).

    Nothing of it is written to disk: no image or vitals value is stored at rest. After a restart or
    eviction the heatmap of an older prediction answers 410.
    """

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._d: OrderedDict[str, tuple[np.ndarray, dict]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: str, image: np.ndarray, vitals: dict) -> None:
        with self._lock:
            self._d[key] = (image.astype(np.float16), dict(vitals))
            while len(self._d) > self.capacity:
                self._d.popitem(last=False)

    def get(self, key: str) -> tuple[np.ndarray, dict] | None:
        with self._lock:
            item = self._d.get(key)
        return None if item is None else (item[0].astype(np.float32), item[1])


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")  # NaN/Infinity: not JSON (RFC 8259), never a missing value


def _parse_vitals_text(text: str | None) -> dict[str, Any]:
    from models.preprocessing import parse_vitals

    if text is None or not text.strip():
        raw: Any = {}
    else:
        try:
            raw = json.loads(text, parse_constant=_reject_constant)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
            raise ApiProblem(422, "malformed-json", f"field 'vitals' is not valid JSON "
                             f"(line {getattr(exc, 'lineno', '?')}, column {getattr(exc, 'colno', '?')})",
                             title="Malformed JSON", field="vitals") from None
    if not isinstance(raw, dict):
        raise ApiProblem(422, "malformed-json", f"field 'vitals' must be a JSON object, got {type(raw).__name__}",
                         title="Malformed JSON", field="vitals")
    return parse_vitals(raw, strict=True)


def _decode(data: bytes, max_pixels: int):
    from models.preprocessing import ImageRefused, decode_dicom

    if not data:
        raise ApiProblem(422, "image-refused/empty", "the image part is empty: expected a DICOM file",
                         title="Image refused", refusal_code="empty")
    try:
        return decode_dicom(data, max_pixels=max_pixels)
    except ImageRefused:
        raise
    except (MemoryError, RecursionError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            EOFError, OSError, NotImplementedError, RuntimeError, OverflowError) as exc:
        # A decoder failure on client input is a refusal, not a server error.
        log.warning("decoder raised %s on an upload: refused as undecodable", type(exc).__name__)
        raise ApiProblem(422, "image-refused/undecodable",
                         "the image could not be decoded: expected a single-frame grayscale chest "
                         "radiograph (CR/DX DICOM) in a supported transfer syntax",
                         title="Image refused", refusal_code="undecodable") from None


_SUPINE_TAGS = ("PatientPosition", "SeriesDescription", "ProtocolName", "StudyDescription",
                "AcquisitionDeviceProcessingDescription", "ViewName")


def is_supine(data: bytes) -> bool:
    """True when the header says the patient was supine (only this flag is kept, never the text)."""
    try:
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True, specific_tags=list(_SUPINE_TAGS))
        return any("SUPINE" in str(ds.get(t, "") or "").upper() for t in _SUPINE_TAGS)
    except Exception:
        return False


def _warnings(decoded, image: np.ndarray, vitals: dict, result: dict, model,
              supine: bool = False) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    view = (getattr(decoded, "view", None) or "")
    if supine or view.replace("_", " ").upper() in ("AP SUPINE", "APSUPINE"):
        out.append({"code": "ap-supine", "message": "AP supine view: the model was trained mostly on erect "
                    "PA/AP films; supine films show different heart size and vascular pattern"})
    elif not view:
        out.append({"code": "view-missing", "message": "ViewPosition missing: a frontal view is assumed"})
    missing = [f for f in VITAL_FIELDS if vitals.get(f) is None]
    if missing:
        out.append({"code": "vitals-missing", "message": "vitals missing: " + ", ".join(missing) +
                    " (the model uses a missing-indicator; accuracy is lower)"})
    age = vitals.get("age_years")
    if age is not None and float(age) < 18:
        out.append({"code": "age-under-18", "message": f"age {float(age):g} years: the model is for adults "
                    "(18+); its output for children is not validated"})
    flat = image.reshape(-1)
    spread = float(np.percentile(flat, 99) - np.percentile(flat, 1))
    if float(flat.std()) < LOW_CONTRAST_STD or spread < LOW_RANGE:
        out.append({"code": "low-image-quality", "message": f"very low image contrast (1-99% intensity spread "
                    f"{spread:.3f}): check the exposure and windowing"})
    ood_thr = ((getattr(model, "reference", None) or {}).get("ood") or {}).get("threshold")
    ood = result.get("ood_score")
    if ood is not None and ood_thr is not None and float(ood) > float(ood_thr):
        out.append({"code": "out-of-distribution", "message": f"input unlike the training data (OOD score "
                    f"{float(ood):.2f} > reference {float(ood_thr):.2f}): interpret with caution"})
    seen = {w["code"] for w in out}
    for text in getattr(decoded, "warnings", None) or []:
        code = "image-" + "".join(c if c.isalnum() else "-" for c in str(text).split(":")[0].lower())[:40].strip("-")
        if code not in seen and not any(k in str(text).lower() for k in ("supine", "viewposition", "view position")):
            out.append({"code": code, "message": str(text)[:300]})
            seen.add(code)
    return out


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
    site: Annotated[str | None, Form(pattern=SITE_PATTERN, description="site code")] = None,
    accession: Annotated[str | None, Form(max_length=64, description="accession number; stored only as a "
                                          "keyed hash")] = None,
    principal: Principal = Depends(require("prediction.create")),
):
    from app import metrics
    from compliance.audit import record_event
    from models.preprocessing import prepare_image

    settings = request.app.state.settings
    parsed = _parse_vitals_text(vitals)
    with request.app.state.decode_slots:  # bounds the memory of concurrent full-size decodes
        data = image.file.read(settings.max_upload_bytes + 1)
        decoded = _decode(data, settings.max_image_pixels)
        supine = is_supine(data)
        del data
        prepared = prepare_image(decoded.pixels, settings.cache_image_size)
        view = getattr(decoded, "view", None)
        decoded.pixels = None  # the full-size image is not needed any more

    lm = service(request).current()  # taken once: this request finishes with this model
    if lm is None:
        raise ApiProblem(503, "not-ready", "no champion model is loaded yet; retry shortly",
                         headers={"Retry-After": "2"})
    result = lm.predict([prepared], [parsed])[0]
    warnings = _warnings(decoded, prepared, parsed, result, lm.model, supine)
    probs = {str(k): float(v) for k, v in result["probabilities"].items()}
    row = {
        "id": storage.new_prediction_id(), "created_at": storage.utc_now(), "model_name": lm.name,
        "model_version": lm.version, "site": site or "unknown",
        "accession_hash": storage.accession_hash(accession), "requested_by": principal.name,
        "probabilities": probs, "p_covid19": float(result["p_covid19"]),
        "operating_threshold": float(lm.model.operating_threshold), "decision": result["decision"],
        "ood_score": None if result.get("ood_score") is None else float(result["ood_score"]),
        "warnings": warnings, "vitals_present": {f: parsed.get(f) is not None for f in VITAL_FIELDS}
        | {"sex": parsed.get("sex") not in (None, "unknown")},
        "view": "AP Supine" if supine and view in (None, "AP") else view,
    }
    pred = storage.save_prediction(row)  # committed durably before we answer
    record_event("prediction.served", actor=principal.name, role=principal.role, subject=f"prediction/{row['id']}",
                 details={"prediction_id": row["id"], "model_name": lm.name, "model_version": lm.version,
                          "site": row["site"], "decision": row["decision"],
                          "warnings": [w["code"] for w in warnings]})
    request.app.state.input_cache.put(row["id"], prepared, parsed)
    try:
        metrics.record_prediction(max(probs, key=probs.get), row["decision"], lm.version, row["site"],
                                  warnings=[w["code"] for w in warnings],
                                  vitals={f: parsed.get(f) for f in VITAL_FIELDS}, image=prepared,
                                  ood_score=row["ood_score"])
    except Exception as exc:  # metrics never fail a stored prediction
        log.warning("metrics: record_prediction failed (%s)", type(exc).__name__)
    return _respond(request, pred)


def _load(prediction_id: uuid.UUID) -> dict[str, Any]:
    pred = storage.get_prediction(str(prediction_id))
    if pred is None:
        raise ApiProblem(404, "prediction-not-found", f"no prediction with id {prediction_id}")
    return pred


@router.get("/{prediction_id}", response_model=PredictionOut, responses={**_RESPONSES, **problem_doc(404, 422)})
def get_prediction(request: Request, prediction_id: uuid.UUID,
                   principal: Principal = Depends(require("prediction.read"))):
    pred = _load(prediction_id)
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
    pred = _load(prediction_id)
    cached = request.app.state.input_cache.get(pred["id"])
    if cached is None:
        raise ApiProblem(410, "heatmap-inputs-gone",
                         "the image of this prediction is no longer held (inputs are kept in memory only, for "
                         "recent predictions of this server process; no image is stored at rest)")
    image, vitals = cached
    lm = service(request).model_for_version(pred["model"]["version"])
    cam = lm.gradcam(image, vitals)
    return Response(content=_overlay_png(image, cam), media_type="image/png",
                    headers={"X-Model-Version": lm.version, "Cache-Control": "no-store"})
