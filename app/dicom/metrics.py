"""Prometheus metrics of the DICOM integration (prefix ``cxr_dicom_``), in ``app.metrics.REGISTRY``.

No label holds a patient, study, instance or accession identifier, an AE title or a host.

``cxr_dicom_instances_received_total`` (counter): instances spooled and acknowledged (C-STORE Success).
``cxr_dicom_instances_processed_total{outcome}`` (counter): ``results`` (result objects built),
    ``refused`` (input gate refused), ``error`` (analysis failed; instance quarantined).
``cxr_dicom_refusals_total{code}`` (counter): refusals by input-gate code (``wrong-modality`` ...).
``cxr_dicom_objects_sent_total{kind}`` (counter): result objects the PACS accepted (``sr``, ``sc``).
``cxr_dicom_send_retries_total`` (counter): failed send attempts that were retried with backoff.
``cxr_dicom_send_failures_total`` (counter): batches whose results could not be sent after every
    retry (their instances stay spooled and are tried again later).
``cxr_dicom_spool_depth`` (gauge): instances on disk waiting for results to be sent.
``cxr_dicom_spool_oldest_age_seconds`` (gauge): age of the oldest waiting instance (0 when empty).
``cxr_dicom_quarantined`` (gauge): instances whose analysis failed, kept for inspection.
``cxr_dicom_roundtrip_seconds`` (histogram): association release -> results accepted by the PACS.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import Counter, Gauge, Histogram

from app.metrics import REGISTRY, safe_label

RECEIVED = Counter("cxr_dicom_instances_received_total", "DICOM instances received and spooled", registry=REGISTRY)
PROCESSED = Counter("cxr_dicom_instances_processed_total", "DICOM instances processed, by outcome",
                    ["outcome"], registry=REGISTRY)
REFUSALS = Counter("cxr_dicom_refusals_total", "DICOM instances refused by the input gate, by code", ["code"],
                   registry=REGISTRY)
SENT = Counter("cxr_dicom_objects_sent_total", "Result objects accepted by the PACS", ["kind"], registry=REGISTRY)
RETRIES = Counter("cxr_dicom_send_retries_total", "Failed C-STORE attempts that were retried", registry=REGISTRY)
SEND_FAILURES = Counter("cxr_dicom_send_failures_total",
                        "Result batches not delivered after every retry (instances stay spooled)", registry=REGISTRY)
SPOOL_DEPTH = Gauge("cxr_dicom_spool_depth", "Received instances waiting in the spool", registry=REGISTRY)
SPOOL_OLDEST = Gauge("cxr_dicom_spool_oldest_age_seconds", "Age of the oldest spooled instance", registry=REGISTRY)
QUARANTINED = Gauge("cxr_dicom_quarantined", "Instances whose analysis failed, kept in quarantine", registry=REGISTRY)
ROUNDTRIP = Histogram("cxr_dicom_roundtrip_seconds", "Association release to results accepted by the PACS",
                      buckets=(0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900), registry=REGISTRY)

for _outcome in ("results", "refused", "error"):
    PROCESSED.labels(_outcome)
for _kind in ("sr", "sc"):
    SENT.labels(_kind)


def bind_spool(depth: Callable[[], float], oldest: Callable[[], float], quarantined: Callable[[], float]) -> None:
    """Spool gauges read the spool folder at scrape time."""
    SPOOL_DEPTH.set_function(depth)
    SPOOL_OLDEST.set_function(oldest)
    QUARANTINED.set_function(quarantined)


def refusal(code: str) -> None:
    PROCESSED.labels("refused").inc()
    REFUSALS.labels(safe_label(code)).inc()
