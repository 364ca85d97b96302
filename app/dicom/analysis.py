"""``analyse`` for the DICOM entry points, over the one prediction service.

``make_analyse()`` (the default ``--analyse`` factory of ``cxr dicom listen``) starts the champion
holder (``app.services.champion.ModelService``: same loader, warm-up and alias polling as the API)
and returns ``analyse(data, accession)``, which calls ``PredictionService.predict`` exactly as
``POST /v1/predictions`` does (input gate, inference, warnings, stored row, ``prediction.served``
audit entry, metrics), with the vitals stored for the accession number by
``PUT /v1/vitals/{accession}`` when there are any (else the missing-vitals path and its warning),
then adds the Grad-CAM map and the approval the result objects show.
"""
from __future__ import annotations

import logging

import numpy as np

from app.dicom.types import Analyse, AnalysisResult, Approval, Refusal

log = logging.getLogger("cxr.dicom.analysis")
ACTOR = "dicom-listener"
ROLE = "service"


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


def analyse_with(service, *, actor: str = ACTOR, role: str = ROLE, channel: str = "dicom",
                 site: str | None = None) -> Analyse:
    """``analyse(data, accession)`` over a ``PredictionService`` (the API's, for STOW-RS; the listener's own)."""
    approvals: dict[str, Approval | None] = {}

    def analyse(data: bytes, accession: str | None) -> AnalysisResult | Refusal:
        from app.problems import ApiProblem
        from app.services.vitals import vitals_for_accession
        from models.preprocessing import ImageRefused

        try:
            served = service.predict(data, vitals_for_accession(accession), site=site, accession=accession,
                                     actor=actor, role=role, channel=channel)
        except ImageRefused as exc:
            return Refusal(exc.code, exc.reason)
        except ApiProblem as exc:
            if exc.status >= 500:  # no champion yet: an outage, not a refusal — the instance stays spooled
                raise RuntimeError(f"prediction service unavailable: {exc.detail}") from None
            return Refusal(exc.extra.get("refusal_code") or exc.code.split("/")[-1], exc.detail)
        lm, rec = served.model, served.record
        cam = np.asarray(lm.gradcam(served.prepared, served.vitals), dtype=np.float32)
        if lm.version not in approvals:
            approvals[lm.version] = approval_of(lm.version)
        return AnalysisResult(
            prediction_id=rec["id"], p_covid19=float(rec["p_covid19"]), probabilities=rec["probabilities"],
            decision=rec["decision"], operating_threshold=float(rec["operating_threshold"]), model_name=lm.name,
            model_version=lm.version,
            image=np.asarray(served.prepared, dtype=np.float32).reshape(served.prepared.shape[-2:]),
            heatmap=cam, warnings=rec["warnings"], approval=approvals[lm.version])

    return analyse


def make_analyse(wait_seconds: float = 180.0) -> Analyse:
    """The listener's ``analyse``; its predictions are filed under ``CXR_DICOM_SITE`` (the site whose
    PACS sends to this listener; ``unknown`` when unset)."""
    from app.services.champion import ModelService
    from app.services.predictions import PredictionService
    from core.config import get_settings

    settings = get_settings()
    champion = ModelService(poll_seconds=settings.champion_poll_seconds, image_size=settings.cache_image_size)
    champion.start()
    if not champion.wait_ready(wait_seconds):
        champion.stop()
        raise RuntimeError(f"no champion model loaded within {wait_seconds:.0f} s "
                           f"({champion.last_error or 'is the champion alias set? cxr model approve ...'})")
    analyse = analyse_with(PredictionService(champion, settings), site=settings.dicom_site)
    analyse.service = champion  # type: ignore[attr-defined]
    return analyse
