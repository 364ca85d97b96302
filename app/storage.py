"""Storage of served predictions and recorded outcomes (tables in ``core.schema``).

No PHI is stored: a prediction row holds a random id (uuid4), the UTC time, the model name and
version, the site code, the accession number only as a keyed HMAC-SHA-256 hash
(``get_settings().secret("pseudonym_key")``), the calibrated probabilities, the decision, the
warnings and, for the vitals, only which fields were present (never their values). An outcome row
holds the confirmed class and/or the RT-PCR result, who recorded it and when; a correction is a new
row that names the row it supersedes, the signer and the reason (rows are never updated in place).

A row is committed (SQLite WAL + ``synchronous=FULL``) before the API answers 200.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select

from core.config import get_settings
from core.db import session_scope
from core.schema import OutcomeRow, PredictionRow


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def accession_hash(accession: str | None) -> str | None:
    """Keyed hash of an accession number (the number itself is never stored)."""
    if not accession:
        return None
    key = get_settings().secret("pseudonym_key").encode()
    return hmac.new(key, accession.strip().encode("utf-8"), hashlib.sha256).hexdigest()






def new_prediction_id() -> str:
    return str(uuid.uuid4())


def save_prediction(row: dict[str, Any]) -> dict[str, Any]:
    """Insert one prediction and commit it durably; returns the stored row as a dict."""
    return save_prediction_sealed(row)[0]


def prediction_row(row: dict[str, Any]) -> PredictionRow:
    """The ``predictions`` row for ``row`` (not yet stored)."""
    return PredictionRow(
        id=row["id"], created_at=row["created_at"], model_name=row["model_name"],
        model_version=str(row["model_version"]), site=row["site"], accession_hash=row.get("accession_hash"),
        requested_by=row["requested_by"], probabilities=json.dumps(row["probabilities"], sort_keys=True),
        p_covid19=float(row["p_covid19"]), operating_threshold=float(row["operating_threshold"]),
        decision=row["decision"], ood_score=row.get("ood_score"),
        warnings=json.dumps(row["warnings"]), vitals_present=json.dumps(row["vitals_present"], sort_keys=True),
        view=row.get("view"),
        deployment_prevalence=row.get("deployment_prevalence"),
        p_covid19_at_site_prevalence=row.get("p_covid19_at_site_prevalence"),
    )


def save_prediction_sealed(row: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """``save_prediction`` + the SHA-256 of the stored row (``compliance.audit.row_sha256``), which the
    ``prediction.served`` audit entry carries so an edited row is detected by ``cxr audit verify``."""
    from compliance.audit import row_sha256

    obj = prediction_row(row)
    with session_scope() as s:
        s.add(obj)
        s.flush()
        digest = row_sha256(obj)
    return obj.as_dict(), digest


def get_prediction(prediction_id: str) -> dict[str, Any] | None:
    with session_scope() as s:
        row = s.get(PredictionRow, prediction_id)
        return row.as_dict() if row else None


def prediction_ids() -> set[str]:
    with session_scope() as s:
        return set(s.execute(select(PredictionRow.id)).scalars().all())


def outcomes_for(prediction_id: str) -> list[dict[str, Any]]:
    with session_scope() as s:
        rows = s.execute(select(OutcomeRow).where(OutcomeRow.prediction_id == prediction_id)
                         .order_by(OutcomeRow.id)).scalars().all()
        return [r.as_dict() for r in rows]


def current_outcome(prediction_id: str) -> dict[str, Any] | None:
    """The outcome in force: the latest row (a correction supersedes what it names)."""
    rows = outcomes_for(prediction_id)
    return rows[-1] if rows else None


def save_outcome(row: dict[str, Any]) -> dict[str, Any]:
    return save_outcome_sealed(row)[0]


def save_outcome_sealed(row: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Insert one outcome; returns (the stored row as a dict, its row SHA-256 for ``outcome.recorded``)."""
    from compliance.audit import row_sha256

    obj = OutcomeRow(**row)
    with session_scope() as s:
        s.add(obj)
        s.flush()
        out = obj.as_dict()
        digest = row_sha256(obj)
    return out, digest
