"""PUT /v1/vitals/{accession}: vitals for a study that will arrive over DICOM (listener or STOW-RS)."""
from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path

from app.api import problem_doc
from app.auth import Principal, require

router = APIRouter(prefix="/v1/vitals", tags=["vitals"])


@router.put("/{accession}", responses=problem_doc(422),
            summary="Store vitals for an accession number; a DICOM study with that number uses them")
def put_vitals(
    accession: Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$",
                                   description="the study's accession number (stored only as a keyed hash)")],
    vitals: Annotated[dict[str, Any], Body(description="temperature_c, spo2_percent, heart_rate_bpm, "
                                           "respiratory_rate, systolic_bp_mmhg, age_years, sex")],
    principal: Principal = Depends(require("vitals.put")),
):
    from app.services.predictions import validate_vitals
    from app.services.vitals import store_vitals
    from compliance.audit import record_event

    parsed = validate_vitals(vitals)
    stored = store_vitals(accession, parsed, stored_by=principal.name)
    record_event("vitals.stored", actor=principal.name, role=principal.role,
                 subject=f"accession/{stored['accession_hash'][:16]}",
                 details={"accession_hash": stored["accession_hash"], "fields": stored["fields"],
                          "expires_at": stored["expires_at"]})
    return {"accession_hash": stored["accession_hash"], "fields": stored["fields"],
            "expires_at": stored["expires_at"]}
