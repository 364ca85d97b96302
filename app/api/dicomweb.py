"""DICOMweb STOW-RS: ``POST /dicomweb/studies`` (PS3.18 §10.5), the same path as the DICOM listener.

The body is ``multipart/related; type="application/dicom"``: one DICOM Part 10 instance per part.
Each instance goes through ``app.dicom.pipeline.handle_instances`` with ``analyse`` over the API's
own ``PredictionService`` (input gate, inference, stored row, audit, metrics — exactly the REST
path), attributed to the caller's token. The results (SR + secondary capture) are C-STORE'd to the
hospital PACS named by ``CXR_DICOM_SEND_TO`` (``AET@HOST:PORT``) when set. The answer is the standard
STOW-RS response (``application/dicom+json``: ReferencedSOPSequence, FailedSOPSequence with the
failure reason): 200 all stored, 202 some refused, 409 none.
"""
from __future__ import annotations

import logging
import re
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from app.api import predictions_service, problem_doc
from app.auth import Principal, authorise_filing_site, require
from app.problems import ApiProblem
from app.schemas import SITE_PATTERN

log = logging.getLogger("cxr.api.dicomweb")
router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])
DICOM_JSON = "application/dicom+json"
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.I)
_TYPE = re.compile(r'(?:^|;)\s*type="?([^";]+)"?', re.I)


def split_multipart_related(body: bytes, content_type: str) -> list[bytes]:
    """The ``application/dicom`` parts of a ``multipart/related`` body (RFC 2387), in order."""
    ctype = content_type.lower()
    if not ctype.startswith("multipart/related"):
        raise ApiProblem(415, "unsupported-media-type", "STOW-RS expects Content-Type multipart/related; "
                         'type="application/dicom"; boundary=...')
    part_type = _TYPE.search(content_type)
    if part_type and part_type.group(1).strip().lower() != "application/dicom":
        raise ApiProblem(415, "unsupported-media-type", 'only type="application/dicom" parts are accepted '
                         "(DICOM Part 10 instances); metadata+bulkdata STOW is not supported")
    m = _BOUNDARY.search(content_type)
    if not m:
        raise ApiProblem(400, "multipart-boundary-missing", "the multipart/related Content-Type has no boundary")
    delim = b"--" + m.group(1).encode("latin-1")
    parts = []
    for chunk in body.split(delim)[1:]:
        if chunk.startswith(b"--"):  # closing delimiter
            break
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk
        head, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise ApiProblem(400, "multipart-malformed", "a multipart part has no header/body separator")
        headers = head.decode("latin-1").lower()
        if "content-type:" in headers and "application/dicom" not in headers:
            raise ApiProblem(415, "unsupported-media-type", "a part is not application/dicom")
        parts.append(payload[:-2] if payload.endswith(b"\r\n") else payload)
    if not parts:
        raise ApiProblem(400, "multipart-empty", "the STOW-RS request holds no DICOM instance")
    return parts


def _store(request: Request, parts: list[bytes], principal: Principal, site: str | None) -> tuple[dict, int]:
    from app.dicom.analysis import analyse_with
    from app.dicom.pipeline import handle_instances, record_sent, stow_response, stow_status
    from app.dicom.sender import Destination, Sender, SendError

    analyse = analyse_with(predictions_service(request), actor=principal.name, role=principal.role, channel="stow",
                           site=site)
    outcomes = handle_instances(parts, analyse, actor=principal.name, via="stow-rs")
    send_to = request.app.state.settings.dicom_send_to
    if send_to:
        dest = Destination.parse(send_to)
        sender = Sender(dest, attempts=3)
        for o in outcomes:
            if o.status == "results" and o.objects is not None:
                try:
                    sender.send(o.objects.datasets())
                    record_sent(o, actor=principal.name, destination=str(dest), via="stow-rs")
                except SendError as exc:  # the prediction is stored; the PACS copy is what failed
                    log.warning("STOW-RS results not delivered to the PACS: %s", type(exc).__name__)
    return stow_response(outcomes), stow_status(outcomes)


@router.post("/studies", status_code=200, responses=problem_doc(400, 413, 415, 503),
             summary="STOW-RS: store DICOM instances; each chest radiograph is analysed")
async def stow_studies(request: Request, site: Annotated[str | None, Query(
                            pattern=SITE_PATTERN, description="site code: one of the caller's sites (may be omitted "
                                                              "by a single-site user)")] = None,
                        principal: Principal = Depends(require("dicomweb.store"))):
    site = authorise_filing_site(principal, site)  # the same rule as POST /v1/predictions
    parts = split_multipart_related(await request.body(), request.headers.get("content-type", ""))
    body, status = await run_in_threadpool(_store, request, parts, principal, site)
    return JSONResponse(body, status_code=status, media_type=DICOM_JSON)
