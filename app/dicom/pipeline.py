"""One received instance -> analysis -> result objects (or a recorded refusal); shared by the DICOM
listener and the STOW-RS route.

:func:`handle_instances` takes DICOM instances (Part 10 bytes or pydicom Datasets) and an
``analyse`` callable (:mod:`app.dicom.types`) and returns one :class:`InstanceOutcome` each:

* ``results``: the SR + secondary capture (``app.dicom.results``) to send back to the PACS;
* ``refused``: the input gate refused it; an audit entry ``dicom.instance.refused`` holds the
  refusal code and a keyed hash of the SOP Instance UID; one log line without patient data;
* ``error``: the analysis raised (a bug or an outage, not the input's fault); audit
  ``dicom.instance.failed``; the caller keeps the instance (the listener quarantines it).

:func:`stow_response` turns outcomes into the STOW-RS response body (DICOM JSON, PS3.18 10.5.3).
"""
from __future__ import annotations

import hashlib
import hmac
import io
import logging
from dataclasses import dataclass
from typing import Any, Iterable

import pydicom
from pydicom.dataset import Dataset

from app.dicom import metrics
from app.dicom.results import ResultObjects, build_results
from app.dicom.types import Analyse, AnalysisResult, Refusal

log = logging.getLogger("cxr.dicom")
ACTOR_ROLE = "system"
# STOW-RS FailureReason (0008,1197) values (PS3.18 / PS3.7 C-STORE statuses)
FAILURE_PROCESSING = 0x0110  # processing failure (analysis error)
FAILURE_CANNOT_UNDERSTAND = 0xC000  # refused by the input gate / not DICOM


@dataclass
class InstanceOutcome:
    status: str  # "results" | "refused" | "error"
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None  # kept in memory only (STOW response); never logged or stored
    instance_hash: str | None = None
    result: AnalysisResult | None = None
    objects: ResultObjects | None = None
    refusal: Refusal | None = None
    error: str | None = None


def keyed_hash(value: str | None) -> str | None:
    """HMAC-SHA-256 of an identifier with the site's pseudonym key (as the API hashes accessions)."""
    if not value:
        return None
    from core.config import get_settings

    key = get_settings().secret("pseudonym_key").encode()
    return hmac.new(key, str(value).strip().encode("utf-8"), hashlib.sha256).hexdigest()


def sop_class_name(uid: str | None) -> str:
    if not uid:
        return "unknown"
    name = pydicom.uid.UID(str(uid)).name
    return name if name and name != str(uid) else "unknown SOP class"


def _as_bytes(instance: bytes | Dataset) -> bytes:
    if isinstance(instance, (bytes, bytearray, memoryview)):
        return bytes(instance)
    buf = io.BytesIO()
    instance.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def read_header(data: bytes) -> Dataset | None:
    """The header (no pixel data) when the bytes are readable DICOM, else None (the gate will refuse them)."""
    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - any unreadable input is the gate's to refuse
        return None


def process_instance(data: bytes | Dataset, analyse: Analyse, *, actor: str, via: str = "dicom") -> InstanceOutcome:
    """Analyse one instance and build its result objects, or record its refusal / failure."""
    from compliance.audit import record_event

    data = _as_bytes(data)
    header = read_header(data)
    sop_class = str(header.get("SOPClassUID", "") or "") if header is not None else None
    sop_uid = str(header.get("SOPInstanceUID", "") or "") if header is not None else None
    accession = (str(header.get("AccessionNumber", "") or "").strip() or None) if header is not None else None
    out = InstanceOutcome(status="error", sop_class_uid=sop_class or None, sop_instance_uid=sop_uid or None,
                          instance_hash=keyed_hash(sop_uid))
    try:
        answer = analyse(data, accession)
    except Exception as exc:  # noqa: BLE001 - analysis failure: keep the instance, report the type only
        out.error = type(exc).__name__
        metrics.PROCESSED.labels("error").inc()
        log.error("analysis failed (%s) for an instance (%s) received via %s", out.error,
                  sop_class_name(sop_class), via)
        record_event("dicom.instance.failed", actor=actor, role=ACTOR_ROLE, subject="dicom-instance",
                     details={"error": out.error, "sop_class": sop_class_name(sop_class),
                              "instance_hash": out.instance_hash, "via": via})
        return out
    if isinstance(answer, Refusal):
        out.status, out.refusal = "refused", answer
        metrics.refusal(answer.code)
        log.info("instance refused by the input gate: code=%s sop_class=%s via=%s", answer.code,
                 sop_class_name(sop_class), via)
        record_event("dicom.instance.refused", actor=actor, role=ACTOR_ROLE, subject="dicom-instance",
                     details={"refusal_code": answer.code, "sop_class": sop_class_name(sop_class),
                              "instance_hash": out.instance_hash, "via": via})
        return out
    if not isinstance(answer, AnalysisResult):
        raise TypeError(f"analyse returned {type(answer).__name__}: expected AnalysisResult or Refusal")
    if header is None or not sop_uid or "StudyInstanceUID" not in header:
        # analysed, yet no usable header to put results into its study: cannot happen with the
        # real gate (it refuses non-DICOM); be explicit rather than send orphan objects.
        out.error = "no-study-identifiers"
        metrics.PROCESSED.labels("error").inc()
        record_event("dicom.instance.failed", actor=actor, role=ACTOR_ROLE, subject="dicom-instance",
                     details={"error": out.error, "via": via})
        return out
    try:
        out.objects = build_results(header, answer)
    except Exception as exc:  # noqa: BLE001
        out.error = f"result-objects: {type(exc).__name__}"
        metrics.PROCESSED.labels("error").inc()
        log.error("building result objects failed (%s) for prediction %s", type(exc).__name__, answer.prediction_id)
        record_event("dicom.instance.failed", actor=actor, role=ACTOR_ROLE, subject="dicom-instance",
                     details={"error": out.error, "prediction_id": answer.prediction_id,
                              "instance_hash": out.instance_hash, "via": via})
        return out
    out.status, out.result = "results", answer
    metrics.PROCESSED.labels("results").inc()
    return out


def handle_instances(instances: Iterable[bytes | Dataset], analyse: Analyse, *, actor: str = "dicom-stow",
                     via: str = "stow-rs") -> list[InstanceOutcome]:
    """Analyse each instance (in order); the STOW-RS route sends the ``results`` outcomes' objects on."""
    return [process_instance(inst, analyse, actor=actor, via=via) for inst in instances]


def record_sent(outcome: InstanceOutcome, *, actor: str, destination: str, via: str = "dicom") -> None:
    """Audit entry once the PACS accepted an instance's result objects."""
    from compliance.audit import record_event

    assert outcome.result is not None
    record_event("dicom.results.sent", actor=actor, role=ACTOR_ROLE,
                 subject=f"prediction/{outcome.result.prediction_id}",
                 details={"prediction_id": outcome.result.prediction_id, "model_name": outcome.result.model_name,
                          "model_version": outcome.result.model_version, "decision": outcome.result.decision,
                          "objects": ["sr", "sc"], "destination_ae": destination.split("@")[0],
                          "instance_hash": outcome.instance_hash, "via": via})


def stow_response(outcomes: Iterable[InstanceOutcome], retrieve_url: str | None = None) -> dict[str, Any]:
    """The STOW-RS response body (``application/dicom+json``).

    ``ReferencedSOPSequence`` (0008,1199): instances accepted and analysed; ``FailedSOPSequence``
    (0008,1198): refused (FailureReason 0xC000) or failed (0x0110) instances. HTTP status: 200 when
    all are referenced, 202 when some failed, 409 when none were accepted (see :func:`stow_status`).
    """
    ok, failed = [], []
    for o in outcomes:
        item: dict[str, Any] = {}
        if o.sop_class_uid:
            item["00081150"] = {"vr": "UI", "Value": [o.sop_class_uid]}
        if o.sop_instance_uid:
            item["00081155"] = {"vr": "UI", "Value": [o.sop_instance_uid]}
        if o.status == "results":
            ok.append(item)
        else:
            reason = FAILURE_CANNOT_UNDERSTAND if o.status == "refused" else FAILURE_PROCESSING
            failed.append({**item, "00081197": {"vr": "US", "Value": [reason]}})
    body: dict[str, Any] = {}
    if retrieve_url:
        body["00081190"] = {"vr": "UR", "Value": [retrieve_url]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    body["00081199"] = {"vr": "SQ", "Value": ok} if ok else {"vr": "SQ"}
    return body


def stow_status(outcomes: list[InstanceOutcome]) -> int:
    n_ok = sum(o.status == "results" for o in outcomes)
    if outcomes and n_ok == len(outcomes):
        return 200
    return 202 if n_ok else 409
