"""POST /v1/predictions/{id}/outcome: the confirmed diagnosis, once per prediction.

* The first outcome is stored (201) and counted in ``cxr_outcomes_total`` (truth x decision).
* The same outcome again is idempotent (200, nothing new stored or counted).
* A *different* outcome is 409 unless the request carries ``correction`` = the caller's password
  (re-authentication, §11.200) and a reason: then a new row supersedes the old one, signed with the
  caller's printed name. Corrections are audited; the counters are not decremented (Prometheus
  counters only grow), so a correction is visible in the audit trail and the outcomes table.
* The reason is stored with the outcome row; the audit entry carries only its SHA-256 (free text
  might hold PHI).
* "Once" is a database constraint, not only this process's lock: a unique index admits one first
  outcome per prediction and one correction per superseded row (``core.schema.OutcomeRow``). When
  another replica commits first, the insert fails here and the request is answered as if it had
  arrived second (200 for the same outcome, 409 for a different one).
* A clinician records outcomes only for their sites' predictions (404 otherwise).
"""
from __future__ import annotations

import hashlib
import threading
import uuid
from datetime import datetime

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from app import storage
from app.api import problem_doc
from app.api.predictions import load_visible
from app.auth import Principal, require
from app.problems import ApiProblem
from app.schemas import OutcomeIn, OutcomeOut

router = APIRouter(prefix="/v1/predictions", tags=["outcomes"])
_outcome_lock = threading.Lock()  # check-then-insert is atomic within this process


def _seconds_between(a: str, b: str) -> float | None:
    try:
        return (datetime.fromisoformat(b.replace("Z", "+00:00")) -
                datetime.fromisoformat(a.replace("Z", "+00:00"))).total_seconds()
    except ValueError:
        return None


@router.post("/{prediction_id}/outcome", response_model=OutcomeOut, status_code=201,
             responses={200: {"model": OutcomeOut, "description": "the same outcome was already recorded"},
                        **problem_doc(404, 409, 422)})
def record_outcome(request: Request, prediction_id: uuid.UUID, body: OutcomeIn,
                   principal: Principal = Depends(require("outcome.record"))):
    from app import metrics
    from compliance.audit import record_event

    pred = load_visible(prediction_id, principal)
    truth = (body.confirmed_class == "covid19") if body.confirmed_class is not None else body.rtpcr_result == "positive"
    from sqlalchemy.exc import IntegrityError

    try:
        with _outcome_lock:
            row, existing, reason, meaning, row_hash = _record(pred, body, principal, truth)
    except IntegrityError:
        # another process committed first (unique index): answer from what is stored now
        existing = storage.current_outcome(pred["id"])
        if existing is not None and body.correction is None and (existing["confirmed_class"], existing["rtpcr_result"]) \
                == (body.confirmed_class, body.rtpcr_result):
            return JSONResponse(OutcomeOut(**existing).model_dump(mode="json"), status_code=200)
        raise ApiProblem(409, "outcome-conflict", "another outcome for this prediction was recorded at the same time; "
                         "read it and, if it is wrong, send a signed correction",
                         recorded_outcome=None if existing is None else OutcomeOut(**existing).model_dump(mode="json"))
    if isinstance(row, JSONResponse):
        return row
    details = {"prediction_id": pred["id"], "outcome_id": row["id"], "model_version": pred["model"]["version"],
               "site": pred["site"], "confirmed_class": body.confirmed_class, "rtpcr_result": body.rtpcr_result,
               "truth_positive": bool(truth), "decision": pred["decision"], "correction": body.correction is not None,
               "row_sha256": row_hash}
    if body.correction is not None:
        details |= {"supersedes_outcome_id": existing["id"], "signed_by": principal.name,
                    "signature_meaning": meaning, "reason_sha256": hashlib.sha256(reason.encode()).hexdigest()}
    record_event("outcome.recorded", actor=principal.name, role=principal.role, subject=f"prediction/{pred['id']}",
                 details=details)
    if body.correction is None:
        try:
            metrics.record_outcome(pred["site"], pred["model"]["version"], bool(truth),
                                   pred["decision"] == "covid19-positive",
                                   _seconds_between(pred["created_at"], row["recorded_at"]))
        except Exception:
            pass
    return JSONResponse(OutcomeOut(**row).model_dump(mode="json"), status_code=201)


def _record(pred: dict, body: OutcomeIn, principal: Principal, truth: bool):
    """Check against the stored outcome and insert (the unique index decides a cross-process race)."""
    existing = storage.current_outcome(pred["id"])
    same = existing is not None and (existing["confirmed_class"], existing["rtpcr_result"]) == (
        body.confirmed_class, body.rtpcr_result)
    if existing is not None and same and body.correction is None:
        return JSONResponse(OutcomeOut(**existing).model_dump(mode="json"), status_code=200), None, None, None, None
    if existing is None and body.correction is not None:
        raise ApiProblem(409, "nothing-to-correct", "no outcome is recorded for this prediction yet: "
                         "record it without 'correction'")
    if existing is not None and body.correction is None:
        raise ApiProblem(409, "outcome-already-recorded",
                         f"an outcome was already recorded for this prediction at {existing['recorded_at']}; "
                         "a different one needs a signed correction (field 'correction' with your "
                         "password and a reason)", recorded_outcome=OutcomeOut(**existing).model_dump(mode="json"))
    signer_name = meaning = reason = None
    if body.correction is not None:
        from compliance.users import AuthenticationError, authenticate_password

        try:
            signer = authenticate_password(principal.name, body.correction.password, purpose="e-signature")
        except AuthenticationError:
            raise ApiProblem(403, "signature-failed", "e-signature failed: the password does not match the "
                             "calling user (or the account is locked)") from None
        signer_name, meaning, reason = signer.full_name, "correction of a recorded outcome", body.correction.reason
    row, row_hash = storage.save_outcome_sealed({
        "prediction_id": pred["id"], "confirmed_class": body.confirmed_class, "rtpcr_result": body.rtpcr_result,
        "truth_positive": bool(truth), "recorded_by": principal.name, "recorded_at": storage.utc_now(),
        "supersedes_id": existing["id"] if existing else None, "correction_reason": reason,
        "signed_by": signer_name, "signature_meaning": meaning,
    })
    return row, existing, reason, meaning, row_hash
