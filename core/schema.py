"""Every table of the app database, in one schema (the schema that migrations own).

Users and API tokens, the audit trail, e-signatures, served predictions and recorded outcomes.
Tables only: the rules that read and write them live with their owners (``compliance.users``,
``compliance.audit``, ``compliance.approvals``, ``app.storage``).

No PHI in any table: predictions hold a random id, keyed hashes and presence flags, never an image,
a name or a vitals value.
"""
from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    """The one declarative base: ``Base.metadata`` is the whole app schema."""


# ---------------------------------------------------------------- owner: compliance.users
class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    full_name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(40))
    password_hash: Mapped[str] = mapped_column(String(300))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[str] = mapped_column(String(40))
    created_by: Mapped[str] = mapped_column(String(200))
    disabled_at: Mapped[str | None] = mapped_column(String(40), nullable=True)

    def as_dict(self) -> dict:
        return {"name": self.name, "full_name": self.full_name, "role": self.role, "active": self.active,
                "locked": self.locked, "created_at": self.created_at, "created_by": self.created_by,
                "disabled_at": self.disabled_at}

    def __repr__(self) -> str:  # never shows the hash
        return f"User(name={self.name!r}, role={self.role!r}, active={self.active})"


# ---------------------------------------------------------------- owner: compliance.users
class UserSite(Base):
    """The sites a user works for (a clinician files and reads predictions of these sites only).

    The set of all site codes in this table is the set of *configured* sites: only these are
    metric label values and valid ``site`` fields of a prediction."""

    __tablename__ = "user_sites"
    __table_args__ = (UniqueConstraint("user_id", "site", name="uq_user_sites_user_site"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    site: Mapped[str] = mapped_column(String(48), index=True)


# ---------------------------------------------------------------- owner: compliance.users
class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    token_id: Mapped[str] = mapped_column(String(16), unique=True, index=True)  # public handle
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    issued_at: Mapped[str] = mapped_column(String(40))
    issued_by: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[str | None] = mapped_column(String(40), nullable=True)
    revoked_at: Mapped[str | None] = mapped_column(String(40), nullable=True)
    revoked_by: Mapped[str | None] = mapped_column(String(200), nullable=True)


# ---------------------------------------------------------------- owner: compliance.approvals
class ESignature(Base):
    __tablename__ = "e_signatures"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    model: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(20), index=True)
    action: Mapped[str] = mapped_column(String(20))
    meaning: Mapped[str] = mapped_column(String(200))
    signer_name: Mapped[str] = mapped_column(String(64))
    signer_full_name: Mapped[str] = mapped_column(String(200))
    signer_role: Mapped[str] = mapped_column(String(40))
    time_utc: Mapped[str] = mapped_column(String(40))
    reason: Mapped[str] = mapped_column(Text)
    policy_version: Mapped[str | None] = mapped_column(String(40), nullable=True)
    policy_passed: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    policy_override_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    evaluation_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # SHA-256 over the files of the signed model version's artefact (models.serving.artifact_digest):
    # what serving checks the downloaded model against. Null on signatures made before it existed.
    artifact_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    from_version: Mapped[str | None] = mapped_column(String(20), nullable=True)
    signature_sha256: Mapped[str] = mapped_column(String(64))
    audit_seq: Mapped[int] = mapped_column(Integer)
    audit_entry_hash: Mapped[str] = mapped_column(String(64))

    def as_dict(self) -> dict[str, Any]:
        return {c.name: getattr(self, c.name) for c in self.__table__.columns}


# ---------------------------------------------------------------- owner: compliance.audit
class AuditEntry(Base):
    __tablename__ = "audit_trail"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    time_utc: Mapped[str] = mapped_column(String(40))
    actor: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(40))
    action: Mapped[str] = mapped_column(String(80), index=True)
    subject: Mapped[str] = mapped_column(String(200))
    details: Mapped[str] = mapped_column(Text)  # canonical JSON
    prev_hash: Mapped[str] = mapped_column(String(64))
    entry_hash: Mapped[str] = mapped_column(String(64))
    # id of the HMAC key that made entry_hash (compliance.audit_keys); null = plain SHA-256 entry
    key_id: Mapped[str | None] = mapped_column(String(64), nullable=True)

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time_utc": self.time_utc,
            "actor": self.actor,
            "role": self.role,
            "action": self.action,
            "subject": self.subject,
            "details": json.loads(self.details),
            "prev_hash": self.prev_hash,
            "entry_hash": self.entry_hash,
            "key_id": self.key_id,
        }


# ---------------------------------------------------------------- owner: app.storage
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
    # prior shift to the site's configured deployment prevalence (CXR_SITE_PREVALENCE); None when unset
    deployment_prevalence: Mapped[float | None] = mapped_column(Float, nullable=True)
    p_covid19_at_site_prevalence: Mapped[float | None] = mapped_column(Float, nullable=True)

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
            "deployment_prevalence": self.deployment_prevalence,
            "p_covid19_at_site_prevalence": self.p_covid19_at_site_prevalence,
        }


# ---------------------------------------------------------------- owner: app.storage
class OutcomeRow(Base):
    """One recorded outcome. At most one *first* outcome per prediction (``supersedes_id`` NULL) and
    at most one correction per superseded row: both are unique indexes, so two replicas racing to
    record the first outcome (or to correct the same row) cannot both commit."""

    __tablename__ = "outcomes"
    __table_args__ = (
        Index("uq_outcomes_first_per_prediction", "prediction_id", unique=True,
              sqlite_where=text("supersedes_id IS NULL"), postgresql_where=text("supersedes_id IS NULL")),
        Index("uq_outcomes_supersedes", "supersedes_id", unique=True),
    )

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



# ---------------------------------------------------------------- owner: app.services.vitals
class PendingVitals(Base):
    """Vitals sent ahead of a DICOM study (``PUT /v1/vitals/{accession}``), kept for a bounded time.

    Keyed by the accession number's keyed hash (the number itself is never stored); the values are
    held only until ``expires_at`` (``CXR_VITALS_TTL_HOURS``) and purged on every access after it.
    """

    __tablename__ = "pending_vitals"

    accession_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    vitals: Mapped[str] = mapped_column(Text)  # JSON of the validated vitals
    stored_at: Mapped[str] = mapped_column(String(40))
    expires_at: Mapped[str] = mapped_column(String(40), index=True)
    stored_by: Mapped[str] = mapped_column(String(64))
