"""Prometheus metrics of the hospital API (prefix ``cxr_``) and input-drift monitoring.

Everything lives in one dedicated :data:`REGISTRY` (not prometheus-client's global one), served by
the API's ``GET /metrics`` route through :func:`metrics_payload`. The API calls the recording
functions below; it never touches the metric objects directly.

Metrics (every label value is bounded and sanitised: **no label ever holds a patient id, a
prediction id, an accession number or free text**; id-like values are replaced, see
:func:`safe_label`):

``cxr_http_requests_total{route, method, status}`` (counter)
    Finished HTTP requests. ``route`` is the route *template* (``/v1/predictions/{prediction_id}``),
    ``unmatched`` for paths no route matched; ``status`` is the numeric code (``"200"``).
``cxr_http_request_duration_seconds{route, method, status}`` (histogram)
    Wall time from request start to the end of the response body.
``cxr_predictions_total{predicted_class, decision, model_version, site}`` (counter)
    Served predictions: ``predicted_class`` = arg-max class (covid19/other_pneumonia/normal),
    ``decision`` = ``positive``/``negative`` for COVID-19 at the operating threshold.
``cxr_model_info{model_name, model_version, approved_at}`` (gauge, always 1)
    The model being served; one series at a time (the old one is removed on a switch).
``cxr_model_approved_timestamp_seconds{model_name, model_version}`` (gauge)
    Approval time (Unix seconds) of the served model (0 when unknown).
``cxr_model_loaded_timestamp_seconds{model_name, model_version}`` (gauge)
    When this process started serving that version (Grafana's model version timeline).
``cxr_outcomes_total{site, model_version, truth, decision}`` (counter)
    Confirmed outcomes (e.g. RT-PCR) joined to the prediction they belong to. ``truth`` and
    ``decision`` are ``positive``/``negative`` for COVID-19, so PromQL gets the confusion matrix
    per site and model version over any window (recording rules in ``prometheus/rules``). The four
    truth x decision series of a (site, model_version) are created at zero by the first prediction
    of that pair, so ``increase()`` sees the first outcome too.
``cxr_outcome_delay_seconds{site, model_version}`` (histogram)
    Time from prediction to the recorded outcome.
``cxr_input_warnings_total{kind}`` (counter)
    Warnings attached to predictions, by warning code (``ap-supine``, ``vitals-missing``,
    ``age-under-18``, ``out-of-distribution``, ...).
``cxr_ood_predictions_total{model_version, site}`` (counter)
    Predictions whose out-of-distribution score is above the model's reference threshold
    (``cxr_ood_predictions_total / cxr_predictions_total`` = OOD rate).
``cxr_drift_psi{feature, model_version}`` (gauge)
    Population stability index of the last ``window`` inputs against the training-split reference
    stored with the model; ``feature`` is a vitals field or ``image_intensity``. Exported only once
    ``min_samples`` values are in the window (small windows give noisy PSI). > 0.2 = drift alert.
``cxr_drift_window_samples{feature, model_version}`` (gauge)
    Number of values currently in that feature's rolling window.
``cxr_drift_ood_fraction{model_version}`` (gauge)
    Fraction of the rolling window whose OOD score is above the reference threshold.

DICOM listener metrics (defined in ``app/dicom/metrics.py``, registered here when the listener runs):
``cxr_dicom_instances_received_total``, ``cxr_dicom_instances_processed_total{outcome}``,
``cxr_dicom_refusals_total{code}``, ``cxr_dicom_objects_sent_total{kind}``,
``cxr_dicom_send_retries_total``, ``cxr_dicom_send_failures_total``, ``cxr_dicom_spool_depth``,
``cxr_dicom_spool_oldest_age_seconds``, ``cxr_dicom_quarantined``, ``cxr_dicom_roundtrip_seconds``.
``cxr_champion_verification_failures_total{reason}`` (counter)
    Times the API refused to publish the version the ``champion`` alias names (reasons:
    ``no-approval``, ``revoked``, ``signature-invalid``, ``no-artifact-digest``,
    ``alias-not-governed``, ``artifact-mismatch``; each series exported from 0).
``cxr_champion_alias_unverified`` (gauge)
    1 while the alias names a version the API refuses (it keeps the last verified champion), else 0.
    Alert ``CXRChampionVerificationFailed``.
"""
from __future__ import annotations

import math
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = [
    "REGISTRY",
    "VITAL_FIELDS",
    "IMAGE_FEATURE",
    "PSI_ALERT_THRESHOLD",
    "DriftMonitor",
    "MetricsMiddleware",
    "configure_drift",
    "get_drift_monitor",
    "metrics_payload",
    "observe_request",
    "psi",
    "record_input_warning",
    "record_outcome",
    "record_prediction",
    "safe_label",
    "set_model_info",
]

REGISTRY = CollectorRegistry(auto_describe=True)

VITAL_FIELDS = ("temperature_c", "spo2_percent", "heart_rate_bpm", "respiratory_rate", "systolic_bp_mmhg", "age_years")
IMAGE_FEATURE = "image_intensity"
PSI_ALERT_THRESHOLD = 0.2  # the conventional "significant shift" level; alerts.yml uses the same
PSI_EPSILON = 1e-4

# Request latency: the API answers health checks in ms and predictions in 0.1-few s on CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)
# Outcome delay: RT-PCR results arrive within hours to days.
DELAY_BUCKETS = (60, 600, 3600, 6 * 3600, 12 * 3600, 86400, 2 * 86400, 3 * 86400, 7 * 86400, 14 * 86400, 30 * 86400)

HTTP_REQUESTS = Counter(
    "cxr_http_requests_total", "Finished HTTP requests by route template, method and status code.",
    ["route", "method", "status"], registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "cxr_http_request_duration_seconds", "HTTP request latency (seconds) by route template, method and status.",
    ["route", "method", "status"], buckets=LATENCY_BUCKETS, registry=REGISTRY,
)
PREDICTIONS = Counter(
    "cxr_predictions_total", "Predictions served, by arg-max class, COVID-19 decision, model version and site.",
    ["predicted_class", "decision", "model_version", "site"], registry=REGISTRY,
)
MODEL_INFO = Gauge(
    "cxr_model_info", "The model version being served (value 1), with its approval time.",
    ["model_name", "model_version", "approved_at"], registry=REGISTRY,
)
MODEL_APPROVED_TS = Gauge(
    "cxr_model_approved_timestamp_seconds", "Approval time (Unix seconds) of the served model version; 0 if unknown.",
    ["model_name", "model_version"], registry=REGISTRY,
)
MODEL_LOADED_TS = Gauge(
    "cxr_model_loaded_timestamp_seconds", "When this process started serving the model version (Unix seconds).",
    ["model_name", "model_version"], registry=REGISTRY,
)
CHAMPION_VERIFICATION_FAILURES = Counter(
    "cxr_champion_verification_failures", "Times the API refused to publish the version the champion alias names "
    "(no valid approval signature, revoked, alias moved outside governance, artefact digest mismatch), by reason.",
    ["reason"], registry=REGISTRY,
)
CHAMPION_ALIAS_UNVERIFIED = Gauge(
    "cxr_champion_alias_unverified", "1 while the champion alias names a version the API refuses to serve "
    "(it keeps the last verified champion, or none), else 0.", registry=REGISTRY,
)
CHAMPION_REFUSAL_REASONS = ("no-approval", "revoked", "signature-invalid", "no-artifact-digest", "alias-not-governed",
                            "artifact-mismatch", "other")
for _reason in CHAMPION_REFUSAL_REASONS:
    CHAMPION_VERIFICATION_FAILURES.labels(_reason)  # exported from 0, so increase() sees the first failure
CHAMPION_ALIAS_UNVERIFIED.set(0)
OUTCOMES = Counter(
    "cxr_outcomes_total", "Confirmed outcomes by site, model version, truth (COVID-19 positive/negative) and decision.",
    ["site", "model_version", "truth", "decision"], registry=REGISTRY,
)
OUTCOME_DELAY = Histogram(
    "cxr_outcome_delay_seconds", "Delay from prediction to recorded outcome (seconds).",
    ["site", "model_version"], buckets=DELAY_BUCKETS, registry=REGISTRY,
)
INPUT_WARNINGS = Counter(
    "cxr_input_warnings_total", "Warnings attached to predictions, by warning code.", ["kind"], registry=REGISTRY,
)
OOD_PREDICTIONS = Counter(
    "cxr_ood_predictions_total", "Predictions with an out-of-distribution score above the model's reference threshold.",
    ["model_version", "site"], registry=REGISTRY,
)
DRIFT_PSI = Gauge(
    "cxr_drift_psi", "Population stability index of the rolling input window vs the model's training reference.",
    ["feature", "model_version"], registry=REGISTRY,
)
DRIFT_SAMPLES = Gauge(
    "cxr_drift_window_samples", "Values currently in the rolling drift window of a feature.",
    ["feature", "model_version"], registry=REGISTRY,
)
DRIFT_OOD_FRACTION = Gauge(
    "cxr_drift_ood_fraction", "Fraction of the rolling window with an OOD score above the reference threshold.",
    ["model_version"], registry=REGISTRY,
)


# --------------------------------------------------------------------------------------------
# Label hygiene
# --------------------------------------------------------------------------------------------
_ALLOWED = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,47}$")
_UUID = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")
_LONG_HEX = re.compile(r"[0-9a-fA-F]{16,}")
_LONG_DIGITS = re.compile(r"\d{6,}")
_MAX_SITES = 200
_sites_seen: set[str] = set()
_sites_lock = threading.Lock()


def looks_like_id(value: str) -> bool:
    """True for values that look like an identifier (UUID, long hex hash, long number)."""
    return bool(_UUID.search(value) or _LONG_HEX.search(value) or _LONG_DIGITS.search(value))


def safe_label(value: Any, *, default: str = "unknown") -> str:
    """A bounded, id-free label value: short ``[A-Za-z0-9_.:-]`` text, else ``invalid``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    text = str(value).strip()
    if not _ALLOWED.match(text) or looks_like_id(text):
        return "invalid"
    return text


_site_filter = None  # callable(site) -> bool, installed by the API: only configured sites are labels


def set_site_filter(allowed) -> None:
    """Install the configured-sites check (``None``: no check, label sanitising only)."""
    global _site_filter
    _site_filter = allowed


def _site_label(site: Any) -> str:
    label = safe_label(site)
    if _site_filter is not None and label not in ("unknown", "invalid"):
        try:
            if not _site_filter(label):
                return "unconfigured"
        except Exception:  # noqa: BLE001 - metrics never fail a request
            return "unconfigured"
    with _sites_lock:
        if label in _sites_seen:
            return label
        if len(_sites_seen) >= _MAX_SITES:
            return "other"  # cardinality guard: a client cannot create unlimited series
        _sites_seen.add(label)
        return label


def _version_label(version: Any) -> str:
    text = "unknown" if version is None else str(version).strip()
    # model versions are small integers or short names; an id-like value is refused anyway
    return safe_label(text)


def _positive(decision: Any) -> bool:
    """``covid19-positive`` / ``positive`` / True → True; ``covid19-negative`` / ``negative`` / False → False."""
    if isinstance(decision, bool):
        return decision
    text = str(decision).strip().lower()
    if text in ("covid19-positive", "positive", "pos", "1", "true"):
        return True
    if text in ("covid19-negative", "negative", "neg", "0", "false"):
        return False
    raise ValueError(f"decision must be positive/negative (or covid19-positive/-negative), got {decision!r}")


def _pn(flag: bool) -> str:
    return "positive" if flag else "negative"


_ID_SEGMENT = re.compile(r"^(?:\d+|[0-9a-fA-F\-]{16,}|.*[0-9a-fA-F]{8}-[0-9a-fA-F]{4}.*)$")


def _route_label(route: str | None) -> str:
    """A route template; concrete id segments (if a raw path is passed by mistake) become ``{id}``."""
    if not route:
        return "unmatched"
    route = str(route)
    if not route.startswith("/"):
        return "unmatched"
    parts = [("{id}" if (p and not p.startswith("{") and (_ID_SEGMENT.match(p) or looks_like_id(p))) else p)
             for p in route.split("/")]
    out = "/".join(parts)
    return out[:100]


# --------------------------------------------------------------------------------------------
# Recording functions (the API calls these)
# --------------------------------------------------------------------------------------------
def observe_request(route: str | None, method: str, status: int | str, seconds: float) -> None:
    """Count one finished HTTP request. ``route`` must be the route template, not the raw path."""
    labels = (_route_label(route), str(method).upper()[:10], str(int(status)))
    HTTP_REQUESTS.labels(*labels).inc()
    HTTP_LATENCY.labels(*labels).observe(max(0.0, float(seconds)))


def record_input_warning(kind: str, count: int = 1) -> None:
    """Count a warning code (``ap-supine``, ``vitals-missing``, ``age-under-18``, ...)."""
    INPUT_WARNINGS.labels(safe_label(kind, default="unspecified")).inc(count)


def _init_outcome_series(site: str, version: str) -> None:
    for truth in ("positive", "negative"):
        for decision in ("positive", "negative"):
            OUTCOMES.labels(site, version, truth, decision)  # creates the series at 0
    OUTCOME_DELAY.labels(site, version)


def record_prediction(
    predicted_class: str,
    decision: Any,
    model_version: Any,
    site: str | None = None,
    *,
    warnings: Iterable[str] = (),
    vitals: Mapping[str, Any] | None = None,
    image: np.ndarray | None = None,
    ood_score: float | None = None,
) -> None:
    """Count one served prediction and feed the drift monitor (if one is configured).

    ``decision`` is the model's ``covid19-positive``/``covid19-negative`` (or ``positive``/
    ``negative``/bool); ``warnings`` the warning codes returned to the client; ``vitals`` the parsed
    vitals dict (None = missing); ``image`` the prepared image array (values in [0, 1]);
    ``ood_score`` the model's out-of-distribution score.
    """
    site_l = _site_label(site)
    version_l = _version_label(model_version)
    positive = _positive(decision)
    PREDICTIONS.labels(safe_label(predicted_class), _pn(positive), version_l, site_l).inc()
    _init_outcome_series(site_l, version_l)
    OOD_PREDICTIONS.labels(version_l, site_l)  # exists at 0, so the OOD rate is 0 rather than empty
    for kind in warnings or ():
        record_input_warning(kind)
    monitor = _drift_monitor
    is_ood = False
    if monitor is not None and monitor.model_version == version_l:
        is_ood = monitor.observe(vitals=vitals, image=image, ood_score=ood_score)
    if is_ood:
        OOD_PREDICTIONS.labels(version_l, site_l).inc()


def record_outcome(
    site: str | None,
    model_version: Any,
    truth_positive: bool,
    decision_positive: Any,
    delay_seconds: float | None = None,
) -> None:
    """Count one confirmed outcome: ``truth_positive`` = confirmed COVID-19, ``decision_positive`` =
    the decision the model made at prediction time; ``delay_seconds`` = outcome time - prediction time."""
    site_l = _site_label(site)
    version_l = _version_label(model_version)
    _init_outcome_series(site_l, version_l)
    OUTCOMES.labels(site_l, version_l, _pn(bool(truth_positive)), _pn(_positive(decision_positive))).inc()
    if delay_seconds is not None and math.isfinite(float(delay_seconds)):
        OUTCOME_DELAY.labels(site_l, version_l).observe(max(0.0, float(delay_seconds)))


_model_lock = threading.Lock()
_current_model: tuple[str, str, str] | None = None


def _approved_label(approved_at: Any) -> tuple[str, float]:
    if approved_at in (None, ""):
        return "unknown", 0.0
    if isinstance(approved_at, (int, float)):
        dt = datetime.fromtimestamp(float(approved_at), tz=timezone.utc)
    elif isinstance(approved_at, datetime):
        dt = approved_at if approved_at.tzinfo else approved_at.replace(tzinfo=timezone.utc)
    else:
        try:
            dt = datetime.fromisoformat(str(approved_at).replace("Z", "+00:00"))
        except ValueError:
            return "unknown", 0.0
        dt = dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)
    dt = dt.astimezone(timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ"), dt.timestamp()


def set_model_info(model_version: Any, approved_at: Any = None, model_name: str = "covid-cxr") -> None:
    """Publish the served model (call at start-up and at every champion switch).

    ``approved_at``: datetime, ISO-8601 text, Unix seconds, or None (unknown).
    """
    global _current_model
    name_l = safe_label(model_name)
    version_l = _version_label(model_version)
    approved_l, approved_ts = _approved_label(approved_at)
    with _model_lock:
        if _current_model is not None and _current_model != (name_l, version_l, approved_l):
            old_name, old_version, old_approved = _current_model
            for gauge, labels in ((MODEL_INFO, (old_name, old_version, old_approved)),
                                  (MODEL_APPROVED_TS, (old_name, old_version)),
                                  (MODEL_LOADED_TS, (old_name, old_version))):
                try:
                    gauge.remove(*labels)
                except KeyError:
                    pass
        if _current_model != (name_l, version_l, approved_l):
            MODEL_LOADED_TS.labels(name_l, version_l).set(time.time())
        MODEL_INFO.labels(name_l, version_l, approved_l).set(1)
        MODEL_APPROVED_TS.labels(name_l, version_l).set(approved_ts)
        _current_model = (name_l, version_l, approved_l)


def record_champion_verification_failure(reason: str) -> None:
    CHAMPION_VERIFICATION_FAILURES.labels(reason if reason in CHAMPION_REFUSAL_REASONS else "other").inc()


def set_champion_unverified(flag: bool) -> None:
    CHAMPION_ALIAS_UNVERIFIED.set(1 if flag else 0)


def metrics_payload() -> tuple[bytes, str]:
    """(body, content type) for the API's ``GET /metrics`` (Prometheus text format)."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


# --------------------------------------------------------------------------------------------
# Drift
# --------------------------------------------------------------------------------------------
def psi(expected_fractions: Iterable[float], observed_counts: Iterable[float], epsilon: float = PSI_EPSILON) -> float:
    """Population stability index  sum_i (o_i - e_i) * ln(o_i / e_i).

    ``e`` = the reference bin fractions, ``o`` = observed counts / their total. Both are smoothed
    (every fraction raised to at least ``epsilon``, then renormalised to sum 1) so empty bins give a
    large but finite contribution. Returns NaN when nothing was observed.
    """
    e = np.asarray(list(expected_fractions), dtype=float)
    o = np.asarray(list(observed_counts), dtype=float)
    if e.shape != o.shape or e.ndim != 1 or e.size == 0:
        raise ValueError(f"expected {e.shape} and observed {o.shape} must be 1-D of the same length")
    if np.any(e < 0) or np.any(o < 0):
        raise ValueError("fractions and counts must be non-negative")
    total_o, total_e = o.sum(), e.sum()
    if total_o <= 0 or total_e <= 0:
        return float("nan")
    e = np.maximum(e / total_e, epsilon)
    e = e / e.sum()
    o = np.maximum(o / total_o, epsilon)
    o = o / o.sum()
    return float(np.sum((o - e) * np.log(o / e)))


def _bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Histogram over ``edges``; values outside the reference range count in the end bins (so a
    shift beyond the training range raises PSI instead of vanishing)."""
    n_bins = len(edges) - 1
    widths = np.diff(edges)
    if values.size > 1000 and np.allclose(widths, widths[0], rtol=1e-9, atol=0):
        # equal-width bins (image intensity): direct index, ~10x faster than np.histogram's search
        index = np.floor((values - edges[0]) / widths[0]).astype(np.int64)
        np.clip(index, 0, n_bins - 1, out=index)
        return np.bincount(index, minlength=n_bins)[:n_bins].astype(float)
    clipped = np.clip(values, edges[0], edges[-1])
    counts, _ = np.histogram(clipped, bins=edges)
    return counts.astype(float)


class DriftMonitor:
    """Rolling-window input drift against the reference statistics stored with a model.

    ``reference`` = ``{"vitals": {field: {"edges": [...], "fractions": [...]}},
    "image_intensity": {"edges": [...], "fractions": [...], "statistic"|"unit": "pixels"|"pixel"|"mean"},
    "ood": {"threshold": float}}``. For each vitals field the last ``window`` non-missing values are
    kept; for the image, the last ``window`` images' intensity histograms (``statistic`` "pixels",
    the default: each image's normalised pixel histogram, images weighted equally; "mean": one value
    per image, its mean intensity). PSI per feature is exported to ``cxr_drift_psi`` once at least
    ``min_samples`` values are in the window.
    """

    def __init__(self, reference: Mapping[str, Any], model_version: Any, *, window: int = 200,
                 min_samples: int = 100, export: bool = True) -> None:
        if window < 1 or min_samples < 1:
            raise ValueError("window and min_samples must be >= 1")
        self.model_version = _version_label(model_version)
        self.window = int(window)
        self.min_samples = int(min(min_samples, window))
        self.export = export
        self._lock = threading.Lock()
        self._ref: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for field, spec in (reference.get("vitals") or {}).items():
            self._ref[str(field)] = self._parse_spec(field, spec)
        self.image_statistic = "pixels"
        if reference.get(IMAGE_FEATURE):
            spec = reference[IMAGE_FEATURE]
            self._ref[IMAGE_FEATURE] = self._parse_spec(IMAGE_FEATURE, spec)
            # "statistic" (this module) or "unit" (models/train.py writes "unit": "pixel")
            stat = spec.get("statistic") or {"pixel": "pixels", "pixels": "pixels", "mean": "mean"}.get(
                str(spec.get("unit", "pixel")), str(spec.get("unit")))
            self.image_statistic = str(stat)
            if self.image_statistic not in ("pixels", "mean"):
                raise ValueError(f"image_intensity.statistic must be 'pixels' or 'mean', got {self.image_statistic!r}")
        ood = reference.get("ood") or {}
        self.ood_threshold = float(ood["threshold"]) if ood.get("threshold") is not None else None
        # vitals / "mean": deque of floats; "pixels": deque of per-image normalised histograms
        self._windows: dict[str, deque] = {f: deque(maxlen=self.window) for f in self._ref}
        self._ood: deque = deque(maxlen=self.window)
        if export:
            for feature in self._ref:
                DRIFT_SAMPLES.labels(feature, self.model_version).set(0)

    @staticmethod
    def _parse_spec(feature: str, spec: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        edges = np.asarray(spec["edges"], dtype=float)
        fractions = np.asarray(spec["fractions"], dtype=float)
        if edges.ndim != 1 or len(edges) != len(fractions) + 1 or len(fractions) < 1:
            raise ValueError(f"reference for {feature}: need len(edges) == len(fractions) + 1")
        if np.any(np.diff(edges) <= 0):
            raise ValueError(f"reference for {feature}: edges must increase")
        return edges, fractions

    @property
    def features(self) -> list[str]:
        return list(self._ref)

    def observe(self, vitals: Mapping[str, Any] | None = None, image: np.ndarray | None = None,
                ood_score: float | None = None) -> bool:
        """Add one prediction's inputs; returns True when its OOD score is above the threshold."""
        is_ood = False
        with self._lock:
            if vitals:
                for field, value in vitals.items():
                    if field not in self._ref or field == IMAGE_FEATURE or value is None:
                        continue
                    try:
                        v = float(value)
                    except (TypeError, ValueError):
                        continue
                    if math.isfinite(v):
                        self._windows[field].append(v)
            if image is not None and IMAGE_FEATURE in self._ref:
                pixels = np.asarray(image).ravel()
                if not np.issubdtype(pixels.dtype, np.floating):
                    pixels = pixels.astype(np.float32)
                finite = np.isfinite(pixels)
                if not finite.all():
                    pixels = pixels[finite]
                if pixels.size:
                    if self.image_statistic == "mean":
                        self._windows[IMAGE_FEATURE].append(float(pixels.mean()))
                    else:
                        counts = _bin_counts(pixels, self._ref[IMAGE_FEATURE][0])
                        self._windows[IMAGE_FEATURE].append(counts / counts.sum())
            if ood_score is not None and self.ood_threshold is not None and math.isfinite(float(ood_score)):
                is_ood = float(ood_score) > self.ood_threshold
                self._ood.append(1.0 if is_ood else 0.0)
            if self.export:
                self._export_locked()
        return is_ood

    def _observed_counts(self, feature: str) -> np.ndarray:
        edges, _ = self._ref[feature]
        values = self._windows[feature]
        if feature == IMAGE_FEATURE and self.image_statistic == "pixels":
            return np.sum(np.stack(list(values)), axis=0) if values else np.zeros(len(edges) - 1)
        return _bin_counts(np.asarray(values, dtype=float), edges)

    def _psi_locked(self, feature: str) -> float | None:
        if len(self._windows[feature]) < self.min_samples:
            return None
        return psi(self._ref[feature][1], self._observed_counts(feature))

    def psi_values(self) -> dict[str, float | None]:
        """PSI per feature (None while the window holds fewer than ``min_samples`` values)."""
        with self._lock:
            return {f: self._psi_locked(f) for f in self._ref}

    def samples(self) -> dict[str, int]:
        with self._lock:
            return {f: len(w) for f, w in self._windows.items()}

    def ood_fraction(self) -> float | None:
        with self._lock:
            return (sum(self._ood) / len(self._ood)) if self._ood else None

    def _export_locked(self) -> None:
        for feature in self._ref:
            DRIFT_SAMPLES.labels(feature, self.model_version).set(len(self._windows[feature]))
            value = self._psi_locked(feature)
            if value is not None and math.isfinite(value):
                DRIFT_PSI.labels(feature, self.model_version).set(value)
        if self._ood:
            DRIFT_OOD_FRACTION.labels(self.model_version).set(sum(self._ood) / len(self._ood))

    def clear_exported(self) -> None:
        """Remove this monitor's gauges (on a champion switch the old version's drift disappears)."""
        for gauge, labelsets in ((DRIFT_PSI, [(f, self.model_version) for f in self._ref]),
                                 (DRIFT_SAMPLES, [(f, self.model_version) for f in self._ref]),
                                 (DRIFT_OOD_FRACTION, [(self.model_version,)])):
            for labels in labelsets:
                try:
                    gauge.remove(*labels)
                except KeyError:
                    pass


_drift_monitor: DriftMonitor | None = None


def configure_drift(reference: Mapping[str, Any] | None, model_version: Any, *, window: int = 200,
                    min_samples: int = 100) -> DriftMonitor | None:
    """Start drift monitoring for the served model (call with ``model.reference`` at every champion
    load/switch; the previous monitor's gauges are removed). ``None`` reference disables it."""
    global _drift_monitor
    old = _drift_monitor
    _drift_monitor = (DriftMonitor(reference, model_version, window=window, min_samples=min_samples)
                      if reference else None)
    if old is not None and (_drift_monitor is None or old.model_version != _drift_monitor.model_version):
        old.clear_exported()
    return _drift_monitor


def get_drift_monitor() -> DriftMonitor | None:
    return _drift_monitor


# --------------------------------------------------------------------------------------------
# ASGI middleware
# --------------------------------------------------------------------------------------------
class MetricsMiddleware:
    """Pure ASGI middleware: ``app.add_middleware(MetricsMiddleware)`` (or wrap the app).

    Records every HTTP request with its route *template* (Starlette stores the matched route in
    ``scope["route"]``) and the final status; unhandled exceptions count as 500. Paths listed in
    ``exclude`` (default: none) are not recorded.
    """

    def __init__(self, app: Any, exclude: Iterable[str] = ()) -> None:
        self.app = app
        self.exclude = set(exclude)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: dict) -> None:
            if message.get("type") == "http.response.start":
                status["code"] = int(message.get("status", 500))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path_format", None) or getattr(route, "path", None)
            if template not in self.exclude:
                observe_request(template, scope.get("method", "GET"), status["code"], time.perf_counter() - start)
