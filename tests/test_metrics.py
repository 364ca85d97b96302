"""app.metrics: PSI math, the drift monitor, label hygiene, the ASGI middleware, the payload."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app import metrics as m

VITALS = {"temperature_c": (37.0, 0.6), "spo2_percent": (96.0, 2.0), "heart_rate_bpm": (80.0, 12.0),
          "respiratory_rate": (16.0, 3.0), "systolic_bp_mmhg": (125.0, 15.0), "age_years": (55.0, 15.0)}


# ---------------------------------------------------------------------------------------------
# PSI
# ---------------------------------------------------------------------------------------------
def test_psi_matches_hand_computation():
    # e = (0.5, 0.5), o = (0.3, 0.7):  (-0.2)*ln(0.6) + 0.2*ln(1.4)
    expected = -0.2 * math.log(0.3 / 0.5) + 0.2 * math.log(0.7 / 0.5)
    assert expected == pytest.approx(0.16945957207744065, abs=1e-12)
    assert m.psi([0.5, 0.5], [30, 70]) == pytest.approx(expected, rel=1e-12)
    # counts and fractions are normalised: the scale does not matter
    assert m.psi([1, 1], [3, 7]) == pytest.approx(expected, rel=1e-12)


@pytest.fixture(autouse=True)
def _no_site_filter():
    """These are unit tests of the label rules: without the API's configured-sites filter (an app
    built earlier in this process may have installed it)."""
    from app import metrics

    saved = metrics._site_filter
    metrics.set_site_filter(None)
    yield
    metrics.set_site_filter(saved)


def test_psi_identical_distributions_is_zero_and_symmetric_terms_positive():
    assert m.psi([0.1, 0.2, 0.3, 0.4], [10, 20, 30, 40]) == pytest.approx(0.0, abs=1e-15)
    assert m.psi([0.25] * 4, [40, 30, 20, 10]) > 0


def test_psi_empty_bin_uses_epsilon_smoothing():
    eps = 1e-4
    e = np.array([0.25, 0.25, 0.25, 0.25])
    o = np.array([0.25, 0.25, 0.5, eps]) / (1 + eps)  # the empty bin raised to eps, then renormalised
    by_hand = float(np.sum((o - e) * np.log(o / e)))
    got = m.psi([0.25, 0.25, 0.25, 0.25], [10, 10, 20, 0], epsilon=eps)
    assert math.isfinite(got)
    assert got == pytest.approx(by_hand, rel=1e-12)
    assert m.psi([0.25] * 4, [0, 0, 0, 0]) != m.psi([0.25] * 4, [0, 0, 0, 0])  # NaN: nothing observed


def test_psi_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        m.psi([0.5, 0.5], [1, 2, 3])
    with pytest.raises(ValueError):
        m.psi([0.5, -0.5], [1, 2])


# ---------------------------------------------------------------------------------------------
# Drift monitor
# ---------------------------------------------------------------------------------------------
def _reference(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    vitals = {}
    for field, (mu, sd) in VITALS.items():
        sample = rng.normal(mu, sd, 50000)
        edges = np.quantile(sample, np.linspace(0, 1, 11))  # 10 equal-mass bins, as a reference would
        counts, _ = np.histogram(sample, edges)
        vitals[field] = {"edges": edges.tolist(), "fractions": (counts / counts.sum()).tolist()}
    edges = np.linspace(0, 1, 17)
    counts, _ = np.histogram(rng.beta(2, 3, 500000), edges)
    return {"vitals": vitals,
            "image_intensity": {"edges": edges.tolist(), "fractions": (counts / counts.sum()).tolist()},
            "ood": {"threshold": 0.9}}


def _feed(monitor: m.DriftMonitor, rng: np.random.Generator, n: int, *, shift: dict | None = None,
          image_beta=(2, 3), ood_rate: float = 0.0) -> None:
    shift = shift or {}
    for _ in range(n):
        vitals = {f: float(rng.normal(mu + shift.get(f, 0.0), sd)) for f, (mu, sd) in VITALS.items()}
        image = rng.beta(*image_beta, (1, 24, 24))
        monitor.observe(vitals=vitals, image=image, ood_score=0.95 if rng.random() < ood_rate else 0.2)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_in_distribution_window_stays_below_alert_threshold(seed):
    monitor = m.DriftMonitor(_reference(), "t-in", window=200, min_samples=100, export=False)
    _feed(monitor, np.random.default_rng(seed), 250)
    values = monitor.psi_values()
    assert set(values) == set(VITALS) | {"image_intensity"}
    assert all(v is not None and v < m.PSI_ALERT_THRESHOLD for v in values.values()), values
    assert monitor.samples() == {f: 200 for f in values}  # rolling window: the last 200 only


def test_shifted_inputs_raise_psi_above_threshold_for_the_shifted_features_only():
    monitor = m.DriftMonitor(_reference(), "t-shift", window=200, min_samples=100, export=False)
    rng = np.random.default_rng(11)
    _feed(monitor, rng, 200)  # in distribution first
    assert max(monitor.psi_values().values()) < m.PSI_ALERT_THRESHOLD
    # a variant cohort: hypoxic and febrile, brighter images; the window rolls over to it
    _feed(monitor, rng, 200, shift={"spo2_percent": -6.0, "temperature_c": 1.5}, image_beta=(3, 2))
    values = monitor.psi_values()
    assert values["spo2_percent"] > m.PSI_ALERT_THRESHOLD
    assert values["temperature_c"] > m.PSI_ALERT_THRESHOLD
    assert values["image_intensity"] > m.PSI_ALERT_THRESHOLD
    for field in ("heart_rate_bpm", "respiratory_rate", "systolic_bp_mmhg", "age_years"):
        assert values[field] < m.PSI_ALERT_THRESHOLD, (field, values)


def test_values_outside_the_reference_range_count_in_the_end_bins():
    monitor = m.DriftMonitor(_reference(), "t-range", window=100, min_samples=100, export=False)
    for _ in range(100):
        monitor.observe(vitals={"heart_rate_bpm": 240.0})  # far above every training value
    assert monitor.psi_values()["heart_rate_bpm"] > 1.0


def test_psi_is_not_reported_before_min_samples_and_missing_values_are_skipped():
    monitor = m.DriftMonitor(_reference(), "t-min", window=200, min_samples=100, export=False)
    _feed(monitor, np.random.default_rng(5), 99)
    monitor.observe(vitals={"spo2_percent": None, "heart_rate_bpm": float("nan"), "sex": "F"})
    assert all(v is None for v in monitor.psi_values().values())
    assert monitor.samples()["spo2_percent"] == 99


def test_mean_image_statistic_and_ood_fraction():
    ref = _reference()
    rng = np.random.default_rng(3)
    means = rng.beta(2, 3, (5000, 24 * 24)).mean(axis=1)  # images of _feed: 24 x 24
    edges = np.quantile(means, np.linspace(0, 1, 9))
    counts, _ = np.histogram(means, edges)
    ref["image_intensity"] = {"edges": edges.tolist(), "fractions": (counts / counts.sum()).tolist(), "statistic": "mean"}
    monitor = m.DriftMonitor(ref, "t-mean", window=200, min_samples=100, export=False)
    _feed(monitor, rng, 200, ood_rate=0.3)
    assert monitor.psi_values()["image_intensity"] < m.PSI_ALERT_THRESHOLD
    assert 0.2 < monitor.ood_fraction() < 0.4
    _feed(monitor, rng, 200, image_beta=(2, 2.2))
    assert monitor.psi_values()["image_intensity"] > m.PSI_ALERT_THRESHOLD


def test_configured_monitor_exports_gauges_and_clears_them_on_switch():
    try:
        m.configure_drift(_reference(), "801", window=200, min_samples=100)
        rng = np.random.default_rng(8)
        for i in range(120):
            m.record_prediction("normal", "covid19-negative", "801", "drift-site",
                                vitals={f: float(rng.normal(mu, sd)) for f, (mu, sd) in VITALS.items()},
                                image=rng.beta(2, 3, (1, 16, 16)), ood_score=0.95 if i < 12 else 0.1)
        psi = {s.labels["feature"]: s.value for s in _samples("cxr_drift_psi") if s.labels["model_version"] == "801"}
        assert set(psi) == set(VITALS) | {"image_intensity"}
        assert all(0 <= v < m.PSI_ALERT_THRESHOLD for v in psi.values()), psi
        ood = [s.value for s in _samples("cxr_drift_ood_fraction") if s.labels["model_version"] == "801"]
        assert ood == [pytest.approx(0.1)]
        ood_count = [s.value for s in _samples("cxr_ood_predictions_total")
                     if s.labels["model_version"] == "801" and s.name.endswith("_total")]
        assert ood_count == [12.0]
        m.configure_drift(_reference(), "802")  # champion switch: v801's drift series disappear
        assert not [s for s in _samples("cxr_drift_psi") if s.labels["model_version"] == "801"]
    finally:
        m.configure_drift(None, "802")


# ---------------------------------------------------------------------------------------------
# Recording functions and label hygiene
# ---------------------------------------------------------------------------------------------
def _samples(name: str):
    body, content_type = m.metrics_payload()
    assert content_type.startswith("text/plain")
    out = []
    for family in text_string_to_metric_families(body.decode()):
        if family.name == name or family.name == name.removesuffix("_total"):
            out.extend(family.samples)
    return out


def test_outcomes_counter_gives_the_confusion_matrix_and_cells_start_at_zero():
    m.record_prediction("covid19", "covid19-positive", "811", "cm-site")
    cells = {(s.labels["truth"], s.labels["decision"]): s.value for s in _samples("cxr_outcomes_total")
             if s.labels.get("site") == "cm-site" and s.name == "cxr_outcomes_total"}
    assert cells == {("positive", "positive"): 0, ("positive", "negative"): 0,
                     ("negative", "positive"): 0, ("negative", "negative"): 0}
    for truth, decision, n in ((True, True, 18), (True, False, 2), (False, False, 27), (False, True, 3)):
        for _ in range(n):
            m.record_outcome("cm-site", "811", truth, decision, delay_seconds=7200)
    cells = {(s.labels["truth"], s.labels["decision"]): s.value for s in _samples("cxr_outcomes_total")
             if s.labels.get("site") == "cm-site" and s.name == "cxr_outcomes_total"}
    tp, fn = cells[("positive", "positive")], cells[("positive", "negative")]
    tn, fp = cells[("negative", "negative")], cells[("negative", "positive")]
    assert (tp, fn, tn, fp) == (18, 2, 27, 3)
    assert tp / (tp + fn) == pytest.approx(0.9) and tn / (tn + fp) == pytest.approx(0.9)
    delay_count = [s.value for s in _samples("cxr_outcome_delay_seconds")
                   if s.name == "cxr_outcome_delay_seconds_count" and s.labels["site"] == "cm-site"]
    assert delay_count == [50]


def test_decision_forms_are_normalised_and_garbage_is_refused():
    m.record_prediction("normal", "negative", "812", "norm-site")
    m.record_prediction("covid19", True, "812", "norm-site")
    got = {s.labels["decision"] for s in _samples("cxr_predictions_total") if s.labels.get("site") == "norm-site"}
    assert got == {"positive", "negative"}
    with pytest.raises(ValueError):
        m.record_outcome("norm-site", "812", True, "maybe")


def test_model_info_has_one_series_and_switches():
    m.set_model_info("5", approved_at="2026-11-01T10:00:00+00:00")
    m.set_model_info("6", approved_at=None)
    info = [s for s in _samples("cxr_model_info")]
    assert [(s.labels["model_version"], s.labels["approved_at"], s.value) for s in info] == [("6", "unknown", 1.0)]
    from datetime import datetime, timezone
    m.set_model_info("7", approved_at=datetime(2026, 11, 2, 8, 0, tzinfo=timezone.utc))
    info = [s for s in _samples("cxr_model_info")]
    assert [(s.labels["model_version"], s.labels["approved_at"]) for s in info] == [("7", "2026-11-02T08:00:00Z")]
    ts = [s.value for s in _samples("cxr_model_approved_timestamp_seconds")]
    assert ts == [datetime(2026, 11, 2, 8, 0, tzinfo=timezone.utc).timestamp()]


ID_LIKE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-|[0-9a-fA-F]{16,}|\d{6,}")


def test_no_label_holds_an_id_even_when_callers_pass_one():
    pid = "3f2b8c1e-9d4a-4b7e-8c2d-1a2b3c4d5e6f"
    m.record_prediction("covid19", "covid19-positive", "813", pid, warnings=["deadbeefdeadbeefdeadbeef", "ap-supine"])
    m.record_prediction("covid19", "covid19-positive", "813", "patient 12345678")
    m.record_outcome(pid, "813", True, True, 10)
    m.observe_request(f"/v1/predictions/{pid}/heatmap", "GET", 200, 0.1)   # raw path by mistake
    m.observe_request("/v1/predictions/123456789", "GET", 404, 0.1)
    m.set_model_info("813", approved_at="2026-11-01T10:00:00Z")
    body, _ = m.metrics_payload()
    label_names, label_values = set(), set()
    for family in text_string_to_metric_families(body.decode()):
        assert family.name.startswith("cxr_"), family.name
        for sample in family.samples:
            label_names.update(sample.labels)
            label_values.update(v for k, v in sample.labels.items() if k not in ("le", "approved_at"))
    assert not [n for n in label_names if re.search(r"(^|_)(id|patient|accession|prediction)(_|$)", n)], label_names
    assert not [v for v in label_values if ID_LIKE.search(v)], [v for v in label_values if ID_LIKE.search(v)]
    routes = {s.labels["route"] for s in _samples("cxr_http_requests_total")}
    assert "/v1/predictions/{id}/heatmap" in routes and "/v1/predictions/{id}" in routes
    assert "invalid" in {s.labels["site"] for s in _samples("cxr_predictions_total")}


def test_safe_label():
    assert m.safe_label("site-A") == "site-A"
    assert m.safe_label(None) == "unknown"
    assert m.safe_label("  ") == "unknown"
    assert m.safe_label("two words") == "invalid"
    assert m.safe_label("x" * 60) == "invalid"
    assert m.safe_label("0123456789abcdef0123") == "invalid"


def test_every_metric_is_documented_with_prefix():
    doc = m.__doc__
    for family in m.REGISTRY.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        assert name.startswith("cxr_")
        assert f"``{name}" in doc, f"{name} not documented in app/metrics.py"
        assert family.documentation


# ---------------------------------------------------------------------------------------------
# ASGI middleware
# ---------------------------------------------------------------------------------------------
def test_middleware_records_route_template_and_status():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    async def one(request):
        return JSONResponse({"id": request.path_params["prediction_id"]})

    async def boom(request):
        raise RuntimeError("boom")

    async def metrics_route(request):
        body, content_type = m.metrics_payload()
        return PlainTextResponse(body, media_type=content_type)

    app = Starlette(routes=[Route("/mwtest/{prediction_id}", one), Route("/mwtest-boom", boom),
                            Route("/metrics", metrics_route)])
    app.add_middleware(m.MetricsMiddleware)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/mwtest/abc").status_code == 200
        assert client.get("/mwtest/5f3e1c2a-0000-4000-8000-000000000000").status_code == 200
        assert client.get("/mwtest-boom").status_code == 500
        assert client.get("/no/such/path/1234567").status_code == 404
        scraped = client.get("/metrics").text
    counts = {(s.labels["route"], s.labels["status"]): s.value for s in _samples("cxr_http_requests_total")}
    assert counts[("/mwtest/{prediction_id}", "200")] == 2
    assert counts[("/mwtest-boom", "500")] == 1
    assert counts[("unmatched", "404")] >= 1
    assert "cxr_http_request_duration_seconds_bucket" in scraped
