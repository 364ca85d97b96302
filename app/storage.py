"""Storage of served predictions and recorded outcomes (SQLAlchemy, on ``compliance.db.Base``).

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

from sqlalchemy import Boolean, Float, ForeignKey, Integer, String, Text, select
from sqlalchemy.orm import Mapped, mapped_column

from app.config import get_settings
from compliance.db import Base, session_scope


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def accession_hash(accession: str | None) -> str | None:
    """Keyed hash of an accession number (the number itself is never stored)."""
    if not accession:
        return None
    key = get_settings().secret("pseudonym_key").encode()
    return hmac.new(key, accession.strip().encode("utf-8"), hashlib.sha256).hexdigest()


class PredictionRow(Base):
    __tablename__ = "predictions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    created_at: Mapped[str] = mapped_column(String(40), index=True)
    model_name: Mapped[str] = mapped_column(String(100))
    model_version: Mapped[str] = mapped_column(String(40), index=True)
    site: Mapped[str] = mapped_column(String(64), index=True)
    accession_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    requested_by: Mapped[str] = mapped_column(String(64))
    probabilities: Mapped[str] = mapped_column(Text)  # JSON {class: p}
    p_covid19: Mapped[float] = mapped_column(Float)
    operating_threshold: Mapped[float] = mapped_column(Float)
    decision: Mapped[str] = mapped_column(String(40))
    ood_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    warnings: Mapped[str] = mapped_column(Text)  # JSON [{code, message}]
    vitals_present: Mapped[str] = mapped_column(Text)  # JSON {field: bool} — presence only, no values
    view: Mapped[str | None] = mapped_column(String(20), nullable=True)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created_at": self.created_at,
            "model": {"name": self.model_name, "version": self.model_version},
            "site": self.site,
            "accession_hash": self.accession_hash,
            "requested_by": self.requested_by,
            "probabilities": json.loads(self.probabilities),
            "p_covid19": self.p_covid19,
            "operating_threshold": self.operating_threshold,
            "decision": self.decision,
            "ood_score": self.ood_score,
            "warnings": json.loads(self.warnings),
            "vitals_present": json.loads(self.vitals_present),
            "view": self.view,
        }


class OutcomeRow(Base):
    __tablename__ = "outcomes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    prediction_id: Mapped[str] = mapped_column(ForeignKey("predictions.id"), index=True)
    confirmed_class: Mapped[str | None] = mapped_column(String(40), nullable=True)
    rtpcr_result: Mapped[str | None] = mapped_column(String(20), nullable=True)
    truth_positive: Mapped[bool] = mapped_column(Boolean)
    recorded_by: Mapped[str] = mapped_column(String(64))
    recorded_at: Mapped[str] = mapped_column(String(40))
    supersedes_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    correction_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    signed_by: Mapped[str | None] = mapped_column(String(200), nullable=True)  # printed name (e-signature)
    signature_meaning: Mapped[str | None] = mapped_column(String(100), nullable=True)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "prediction_id": self.prediction_id,
            "confirmed_class": self.confirmed_class,
            "rtpcr_result": self.rtpcr_result,
            "truth_positive": self.truth_positive,
            "recorded_by": self.recorded_by,
            "recorded_at": self.recorded_at,
            "supersedes_id": self.supersedes_id,
            "correction_reason": self.correction_reason,
            "signed_by": self.signed_by,
            "signature_meaning": self.signature_meaning,
        }


def new_prediction_id() -> str:
    return str(uuid.uuid4())


def save_prediction(row: dict[str, Any]) -> dict[str, Any]:
    """Insert one prediction and commit it durably; returns the stored row as a dict."""
    obj = PredictionRow(
        id=row["id"], created_at=row["created_at"], model_name=row["model_name"],
        model_version=str(row["model_version"]), site=row["site"], accession_hash=row.get("accession_hash"),
        requested_by=row["requested_by"], probabilities=json.dumps(row["probabilities"], sort_keys=True),
        p_covid19=float(row["p_covid19"]), operating_threshold=float(row["operating_threshold"]),
        decision=row["decision"], ood_score=row.get("ood_score"),
        warnings=json.dumps(row["warnings"]), vitals_present=json.dumps(row["vitals_present"], sort_keys=True),
        view=row.get("view"),
    )
    with session_scope() as s:
        s.add(obj)
    return obj.as_dict()


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
    obj = OutcomeRow(**row)
    with session_scope() as s:
        s.add(obj)
        s.flush()
        out = obj.as_dict()
    return out
