"""Stop-gap ``analyse`` backed by the registry's champion, until the one prediction service exists.

``make_analyse()`` (the default ``--analyse`` factory of ``cxr dicom listen``) loads the version the
``champion`` alias points to with the API's :class:`app.model_service.ModelService` (same loader,
warm-up and alias polling) and returns ``analyse(data, accession)`` that does what
``POST /v1/predictions`` does for an image without vitals: the input gate
(``models.preprocessing.decode_dicom``), ``prepare_image``, ``predict``, the API's warnings, the
stored prediction row (accession only as a keyed hash), the ``prediction.served`` audit event,
the metrics, and Grad-CAM. Vitals are not looked up yet (the lead's ``PUT /v1/vitals/{accession}``
will supply them): the ``vitals-missing`` warning says so on every result.

When the prediction service of issue 12 lands, replace this module by a factory that returns
``service.analyse_dicom`` (see ``app/dicom/__init__.py``).
"""
from __future__ import annotations

import logging

import numpy as np

from app.dicom.types import Analyse, AnalysisResult, Approval, Refusal

log = logging.getLogger("cxr.dicom.champion")
ACTOR = "dicom-listener"


def approval_of(version: str) -> Approval | None:
    """Who approved ``version`` and when, from its e-signature records (None when not recorded)."""
    try:
        from compliance.approvals import signatures

        rows = [r for r in signatures(version) if r.get("action") in ("approve", "approved", "rollback")]
    except Exception:  # noqa: BLE001
        return None
    if not rows:
        return None
    last = rows[-1]
    return Approval(approved_by=last.get("signer_name"), approved_at=last.get("time_utc"))


def make_analyse(wait_seconds: float = 180.0) -> Analyse:
    from app.config import get_settings
    from app.model_service import ModelService

    settings = get_settings()
    service = ModelService(poll_seconds=settings.champion_poll_seconds, image_size=settings.cache_image_size)
    service.start()
    if not service.wait_ready(wait_seconds):
        service.stop()
        raise RuntimeError(f"no champion model loaded within {wait_seconds:.0f} s "
                           f"({service.last_error or 'is the champion alias set? cxr model approve ...'})")
    approvals: dict[str, Approval | None] = {}

    def analyse(data: bytes, accession: str | None) -> AnalysisResult | Refusal:
        from app import metrics, storage
        from app.api.predictions import VITAL_FIELDS, _warnings, is_supine
        from compliance.audit import record_event
        from models.preprocessing import ImageRefused, decode_dicom, parse_vitals, prepare_image

        try:
            decoded = decode_dicom(data, max_pixels=settings.max_image_pixels)
        except ImageRefused as exc:
            return Refusal(exc.code, exc.reason)
        except Exception as exc:  # noqa: BLE001 - a decoder failure on hospital input is a refusal
            return Refusal("undecodable", f"the image could not be decoded ({type(exc).__name__}): expected a "
                           "single-frame grayscale chest radiograph (CR/DX) in a supported transfer syntax")
        supine = is_supine(data)
        prepared = prepare_image(decoded.pixels, settings.cache_image_size)
        decoded.pixels = None
        vitals = parse_vitals({})
        lm = service.current()
        result = lm.predict([prepared], [vitals])[0]
        cam = np.asarray(lm.gradcam(prepared, vitals), dtype=np.float32)
        warnings = _warnings(decoded, prepared, vitals, result, lm.model, supine)
        probs = {str(k): float(v) for k, v in result["probabilities"].items()}
        view = getattr(decoded, "view", None)
        row = {
            "id": storage.new_prediction_id(), "created_at": storage.utc_now(), "model_name": lm.name,
            "model_version": lm.version, "site": "unknown", "accession_hash": storage.accession_hash(accession),
            "requested_by": ACTOR, "probabilities": probs, "p_covid19": float(result["p_covid19"]),
            "operating_threshold": float(lm.model.operating_threshold), "decision": result["decision"],
            "ood_score": None if result.get("ood_score") is None else float(result["ood_score"]),
            "warnings": warnings, "vitals_present": {f: False for f in VITAL_FIELDS} | {"sex": False},
            "view": "AP Supine" if supine and view in (None, "AP") else view,
        }
        storage.save_prediction(row)
        record_event("prediction.served", actor=ACTOR, role="system", subject=f"prediction/{row['id']}",
                     details={"prediction_id": row["id"], "model_name": lm.name, "model_version": lm.version,
                              "site": row["site"], "decision": row["decision"], "via": "dicom",
                              "warnings": [w["code"] for w in warnings]})
        try:
            metrics.record_prediction(max(probs, key=probs.get), row["decision"], lm.version, row["site"],
                                      warnings=[w["code"] for w in warnings], vitals={f: None for f in VITAL_FIELDS},
                                      image=prepared, ood_score=row["ood_score"])
        except Exception as exc:  # noqa: BLE001
            log.warning("metrics: record_prediction failed (%s)", type(exc).__name__)
        if lm.version not in approvals:
            approvals[lm.version] = approval_of(lm.version)
        return AnalysisResult(
            prediction_id=row["id"], p_covid19=row["p_covid19"], probabilities=probs, decision=row["decision"],
            operating_threshold=row["operating_threshold"], model_name=lm.name, model_version=lm.version,
            image=np.asarray(prepared, dtype=np.float32).reshape(prepared.shape[-2:]), heatmap=cam,
            warnings=warnings, approval=approvals[lm.version])

    analyse.service = service  # type: ignore[attr-defined]
    return analyse
