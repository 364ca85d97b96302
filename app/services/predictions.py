"""The one prediction service: every entry point (REST, DICOMweb STOW-RS, DICOM listener) calls it.

``PredictionService.predict(image, vitals, site=..., accession=..., actor=..., role=...)`` runs, in
order: the input gate (bounded decode, every refusal rule), preparation (the model's preprocessing),
inference on the champion taken once, the warnings, the stored row (committed durably before the
caller answers), the ``prediction.served`` audit entry, the in-memory input cache (for Grad-CAM) and
the metrics. It raises ``ApiProblem`` (a refusal code, an HTTP status and a message a clinician or an
integrator can act on) or ``models.preprocessing.ImageRefused``; callers translate those into their
own protocol (problem+json, a DICOM status, an audit entry for a refused instance).

No PHI leaves this function: the row holds a random id, keyed hashes and presence flags; the audit
entry and the metrics hold codes and versions; the log holds exception types only.
"""
from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from app import storage
from app.problems import ApiProblem

log = logging.getLogger("cxr.api")

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


def parse_vitals_text(text: str | None) -> dict[str, Any]:
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
    return validate_vitals(raw)


def validate_vitals(raw: dict[str, Any]) -> dict[str, Any]:
    """Vitals as every entry point accepts them: units converted, out-of-range values refused
    (``VitalsError`` → 422 problem+json), never clipped."""
    from models.preprocessing import parse_vitals

    return parse_vitals(raw, strict=True)


def decode_upload(data: bytes, max_pixels: int, target_size: int | None = None):
    """The input gate: decode or refuse. ``target_size``: the model-input side; a JPEG 2000 upload is
    then decoded at the smallest resolution level that still covers it (``models.j2k``), every
    refusal rule unchanged, full decode as the fallback."""
    from models.preprocessing import ImageRefused, decode_dicom

    if not data:
        raise ApiProblem(422, "image-refused/empty", "the image part is empty: expected a DICOM file",
                         title="Image refused", refusal_code="empty")
    try:
        return decode_dicom(data, max_pixels=max_pixels, target_size=target_size)
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


def is_supine(decoded) -> bool:
    """True when the header said the patient was supine: the flag ``decode_dicom`` derived from the
    one (bounded) parse of the file — the file is never read, nor inflated, a second time."""
    return bool((getattr(decoded, "dicom_meta", None) or {}).get("supine"))


def input_warnings(decoded, image: np.ndarray, vitals: dict, result: dict, model,
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



def site_prevalence_correction(model, site: str | None, p_covid19: float, settings) -> dict[str, Any]:
    """P(covid19) at the site's deployment prevalence (``CXR_SITE_PREVALENCE``), for the stored row.

    The model's probability is calibrated at its development prevalence (``prior_correction`` in the
    package); a site whose prevalence differs gets the Bayes odds correction beside it. The decision
    stays on the uncorrected probability: the operating threshold was validated there, and changing it
    per site is a release decision, not a serving one. Empty when the site has no configured prevalence
    or the model records no development prevalence.
    """
    prevalence = (getattr(settings, "site_prevalence", None) or {}).get(site or "")
    development = ((getattr(model, "config", None) or {}).get("prior_correction") or {}).get(
        "development_prevalence_covid19")
    if prevalence is None or development is None:
        return {}
    from models.statistics import prior_shift

    return {"deployment_prevalence": float(prevalence),
            "p_covid19_at_site_prevalence": float(prior_shift(p_covid19, float(development), float(prevalence)))}


@dataclass
class ServedPrediction:
    """What ``predict`` returns: the stored record and what a caller needs to render results."""

    record: dict[str, Any]  # the stored row (``storage.save_prediction``), as the API returns it
    prepared: np.ndarray  # the prepared image, float32 (side, side) in [0, 1]
    vitals: dict[str, Any]  # parsed vitals (in memory only)
    model: Any  # the LoadedModel that answered (for Grad-CAM with the same version)


class PredictionService:
    """Input gate → inference → warnings → stored row → audit → metrics, for every entry point.

    ``champion``: the ``ChampionService`` (``.current()`` gives the served model or None);
    ``settings``: limits (``max_upload_bytes``, ``max_image_pixels``, ``cache_image_size``);
    ``decode_slots``: bounds how many full-size decodes run at once (memory);
    ``input_cache``: prepared inputs of recent predictions, in memory only (heatmaps).
    """

    def __init__(self, champion, settings, *, input_cache: InputCache | None = None,
                 decode_slots: threading.BoundedSemaphore | None = None) -> None:
        self.champion = champion
        self.settings = settings
        self.input_cache = input_cache or InputCache()
        self.decode_slots = decode_slots

    def predict(self, image: bytes | BinaryIO, vitals: dict[str, Any] | None, *, site: str | None,
                accession: str | None, actor: str, role: str, channel: str = "rest") -> ServedPrediction:
        """Serve one prediction. ``image``: the DICOM bytes, or a file object read inside a decode slot;
        ``vitals``: already parsed (``models.preprocessing.parse_vitals``); ``channel``: the entry
        point (``rest``, ``stow``, ``dicom``), recorded in the audit entry."""
        from app import metrics
        from compliance.audit import record_event, row_sha256
        from models.preprocessing import prepare_image

        settings = self.settings
        parsed = dict(vitals or {})
        with self.decode_slots or nullcontext():  # bounds the memory of concurrent full-size decodes
            data = image if isinstance(image, (bytes, bytearray)) else image.read(settings.max_upload_bytes + 1)
            decoded = decode_upload(bytes(data), settings.max_image_pixels,
                                    settings.cache_image_size if settings.reduced_decode else None)
            supine = is_supine(decoded)
            del data
            # the decoded object, not its pixels: a reduced level carries its sub-pixel grid offset
            prepared = prepare_image(decoded, settings.cache_image_size)
            view = getattr(decoded, "view", None)
            decoded.pixels = None  # the full-size image is not needed any more

        lm = self.champion.current()  # taken once: this request finishes with this model
        if lm is None:
            refusal = getattr(self.champion, "refusal", None)
            detail = (f"no verified champion model is loaded: the champion alias names a version that failed "
                      f"serving verification ({refusal.reason})") if refusal else \
                "no champion model is loaded yet; retry shortly"
            raise ApiProblem(503, "not-ready", detail,
                             headers={"Retry-After": "2"})
        result = lm.predict([prepared], [parsed])[0]
        warnings = input_warnings(decoded, prepared, parsed, result, lm.model, supine)
        probs = {str(k): float(v) for k, v in result["probabilities"].items()}
        row = {
            "id": storage.new_prediction_id(), "created_at": storage.utc_now(), "model_name": lm.name,
            "model_version": lm.version, "site": site or "unknown",
            "accession_hash": storage.accession_hash(accession), "requested_by": actor,
            "probabilities": probs, "p_covid19": float(result["p_covid19"]),
            "operating_threshold": float(lm.model.operating_threshold), "decision": result["decision"],
            "ood_score": None if result.get("ood_score") is None else float(result["ood_score"]),
            "warnings": warnings, "vitals_present": {f: parsed.get(f) is not None for f in VITAL_FIELDS}
            | {"sex": parsed.get("sex") not in (None, "unknown")},
            "view": "AP Supine" if supine and view in (None, "AP") else view,
        }
        row.update(site_prevalence_correction(lm.model, site, row["p_covid19"], settings))
        stored = storage.prediction_row(row)
        details = {"prediction_id": row["id"], "model_name": lm.name, "model_version": lm.version,
                   "site": row["site"], "decision": row["decision"], "warnings": [w["code"] for w in warnings],
                   "row_sha256": row_sha256(stored)}
        if channel != "rest":
            details["channel"] = channel
        # the row and the entry that records it commit in one transaction (one durable write), before the
        # caller answers: no prediction without its audit entry, and half the fsyncs of two commits
        record_event("prediction.served", actor=actor, role=role, subject=f"prediction/{row['id']}", details=details,
                     rows=(stored,))
        pred = stored.as_dict()
        self.input_cache.put(row["id"], prepared, parsed)
        try:
            metrics.record_prediction(max(probs, key=probs.get), row["decision"], lm.version, row["site"],
                                      warnings=[w["code"] for w in warnings],
                                      vitals={f: parsed.get(f) for f in VITAL_FIELDS}, image=prepared,
                                      ood_score=row["ood_score"])
        except Exception as exc:  # metrics never fail a stored prediction
            log.warning("metrics: record_prediction failed (%s)", type(exc).__name__)
        return ServedPrediction(record=pred, prepared=prepared, vitals=parsed, model=lm)
