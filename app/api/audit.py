"""Compliance endpoints: GET /v1/audit/verify and GET /v1/audit/report."""
from __future__ import annotations

import inspect
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response
from starlette.background import BackgroundTask
from starlette.responses import FileResponse

from app.api import problem_doc
from app.auth import Principal, require
from app.problems import ApiProblem
from app.schemas import AuditVerification

router = APIRouter(prefix="/v1/audit", tags=["audit"])

MEDIA = {"pdf": "application/pdf", "csv": "text/csv", "json": "application/json"}


@router.get("/verify", response_model=AuditVerification)
def verify(principal: Principal = Depends(require("audit.verify"))) -> AuditVerification:
    """The chain (MACs, links, checkpoints outside the database, prediction/outcome row hashes) and every
    e-signature against its audit entry — what ``cxr audit verify`` checks."""
    from compliance.verification import verify_all

    return AuditVerification(**verify_all())


def _parse_time(value: str, name: str) -> str:
    try:
        dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ApiProblem(422, "validation-error", f"query parameter {name!r} must be an ISO-8601 date or date-time "
                         "(e.g. 2026-11-27 or 2026-11-27T08:00:00Z)", field=name) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


@router.get("/report", response_class=Response,
            responses={200: {"content": {m: {} for m in MEDIA.values()}, "description": "the audit report"},
                       **problem_doc(422)})
def report(
    from_: Annotated[str, Query(alias="from", max_length=40, description="start (inclusive), ISO-8601")],
    to: Annotated[str, Query(max_length=40, description="end (exclusive), ISO-8601")],
    format: Annotated[Literal["pdf", "csv", "json"], Query(description="report format")] = "json",
    principal: Principal = Depends(require("audit.report")),
):
    from compliance.reports import export_report

    start, end = _parse_time(from_, "from"), _parse_time(to, "to")
    if end <= start:
        raise ApiProblem(422, "validation-error", "'to' must be after 'from'", field="to")
    tmp = Path(tempfile.mkdtemp(prefix="cxr-report-"))
    out = tmp / f"audit-report.{format}"
    kwargs = {}
    params = inspect.signature(export_report).parameters
    if "actor" in params:
        kwargs["actor"] = principal.name
    if "role" in params:
        kwargs["role"] = principal.role
    from compliance.reports import ReportError

    try:
        written = export_report(start, end, format, out, **kwargs)
    except ReportError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ApiProblem(422, "report-refused", str(exc)) from None
    path = Path(written) if written else out
    return FileResponse(path, media_type=MEDIA[format], filename=path.name,
                        background=BackgroundTask(shutil.rmtree, tmp, ignore_errors=True))
