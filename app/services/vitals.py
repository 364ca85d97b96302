"""Vitals sent ahead of a DICOM study, for the study's prediction (``PUT /v1/vitals/{accession}``).

A modality or PACS pushes the image over DICOM with no vitals; the bedside system (or a clinician)
sends them to the API under the study's accession number first. The listener and STOW-RS look them
up by accession when the study arrives; with none stored, the missing-vitals path runs and its
warning says so. Stored under the accession's keyed hash only, validated exactly as the REST form
field is, and deleted once ``expires_at`` has passed (checked on every store and lookup).
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import delete

from app import storage
from core.config import get_settings
from core.db import session_scope
from core.schema import PendingVitals


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _purge_expired(s, now: datetime) -> None:
    s.execute(delete(PendingVitals).where(PendingVitals.expires_at <= _iso(now)))


def store_vitals(accession: str, vitals: dict[str, Any], *, stored_by: str) -> dict[str, Any]:
    """Store validated vitals for ``accession`` (replacing earlier ones); returns when they expire."""
    now = datetime.now(timezone.utc)
    expires = now + timedelta(hours=get_settings().vitals_ttl_hours)
    key = storage.accession_hash(accession)
    with session_scope() as s:
        _purge_expired(s, now)
        row = s.get(PendingVitals, key)
        if row is None:
            row = PendingVitals(accession_hash=key)
            s.add(row)
        row.vitals = json.dumps(vitals, sort_keys=True)
        row.stored_at, row.expires_at, row.stored_by = _iso(now), _iso(expires), stored_by
    return {"accession_hash": key, "expires_at": _iso(expires),
            "fields": sorted(k for k, v in vitals.items() if v is not None and v != "unknown")}


def vitals_for_accession(accession: str | None) -> dict[str, Any]:
    """The vitals stored for ``accession`` and not yet expired, else ``{}`` (the missing-vitals path)."""
    if not accession:
        return {}
    now = datetime.now(timezone.utc)
    key = storage.accession_hash(accession)
    with session_scope() as s:
        _purge_expired(s, now)
        row = s.get(PendingVitals, key)
        return json.loads(row.vitals) if row is not None else {}
