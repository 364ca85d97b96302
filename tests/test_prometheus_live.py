"""A real Prometheus scrapes app.metrics' registry: recorded sensitivity/specificity equal a known
confusion matrix, the rules evaluate without error, the low-sensitivity alert goes pending, and every
Grafana dashboard query returns data.

The metrics are served here by prometheus_client's own HTTP server on a free loopback port, the
same ``app.metrics.REGISTRY`` the API's ``GET /metrics`` returns. To run the same checks against the
real API, start it and pass its ``host:port`` as ``target`` to ``prometheus_factory``.
"""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
from prometheus_server import REPO_ROOT, free_port, prometheus_factory  # noqa: F401  (fixture)

from app import metrics as m

MODEL_VERSION = "907"  # a version no other test uses; sites are unique to this test too
# site: (TP, FN, TN, FP)
CONFUSION = {
    "live-A": (18, 2, 27, 3),   # sensitivity 0.9, specificity 0.9
    "live-B": (9, 1, 8, 2),     # sensitivity 0.9, specificity 0.8 (too few outcomes for any alert)
    "live-C": (10, 12, 25, 0),  # sensitivity 10/22 with 22 positives -> CXRSensitivityBelowPolicy pending
}
VITAL_MEANS = {"temperature_c": (37.0, 0.6), "spo2_percent": (96.0, 2.0), "heart_rate_bpm": (80.0, 12.0),
               "respiratory_rate": (16.0, 3.0), "systolic_bp_mmhg": (125.0, 15.0), "age_years": (55.0, 15.0)}


def _load_dashboards():
    spec = importlib.util.spec_from_file_location("build_dashboards", REPO_ROOT / "grafana" / "build_dashboards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reference(rng: np.random.Generator) -> dict:
    vitals = {}
    for field, (mu, sd) in VITAL_MEANS.items():
        sample = rng.normal(mu, sd, 20000)
        edges = np.quantile(sample, np.linspace(0, 1, 11))
        counts, _ = np.histogram(sample, edges)
        vitals[field] = {"edges": edges.tolist(), "fractions": (counts / counts.sum()).tolist()}
    edges = np.linspace(0, 1, 17)
    pixels = rng.beta(2, 3, 200000)
    counts, _ = np.histogram(pixels, edges)
    return {"vitals": vitals, "image_intensity": {"edges": edges.tolist(), "fractions": (counts / counts.sum()).tolist()},
            "ood": {"threshold": 0.9}}


def _predict(rng: np.random.Generator, site: str, i: int) -> None:
    vitals = {f: float(rng.normal(mu, sd)) for f, (mu, sd) in VITAL_MEANS.items()}
    image = rng.beta(2, 3, (1, 32, 32)).astype(np.float32)
    positive = i % 3 == 0
    m.record_prediction("covid19" if positive else ("normal" if i % 2 else "other_pneumonia"),
                        "covid19-positive" if positive else "covid19-negative", MODEL_VERSION, site,
                        warnings=["vitals-missing"] if i % 5 == 0 else [],
                        vitals=vitals, image=image, ood_score=0.95 if i % 10 == 0 else 0.1)


def _traffic(seconds: float) -> None:
    m.observe_request("/v1/predictions", "POST", 200, 0.3 + seconds)
    m.observe_request("/v1/predictions/{prediction_id}", "GET", 200, 0.02)
    m.observe_request("/v1/predictions/{prediction_id}/outcome", "POST", 201, 0.01)
    m.observe_request("/v1/predictions", "POST", 500, 0.5)
    m.observe_request("/healthz", "GET", 200, 0.001)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


@pytest.fixture()
def metrics_target():
    """The process's metrics on a real HTTP endpoint; these sites are the test's own: the API's
    configured-sites filter (installed by any app built earlier in this process) is off meanwhile."""
    from prometheus_client import start_http_server

    saved = m._site_filter
    m.set_site_filter(None)

    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=m.REGISTRY)
    yield f"127.0.0.1:{port}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
    m.set_site_filter(saved)


def test_real_prometheus_confusion_matrix_alerts_and_dashboards(metrics_target, prometheus_factory):  # noqa: F811
    rng = np.random.default_rng(7)
    m.set_model_info(MODEL_VERSION, approved_at="2026-11-20T09:30:00Z")
    monitor = m.configure_drift(_reference(rng), MODEL_VERSION, window=200, min_samples=60)
    try:
        # phase 1: predictions (they create the four outcome cells of each site at 0) + requests
        for site in CONFUSION:
            for i in range(30):
                _predict(rng, site, i)
        _traffic(0.1)

        prom = prometheus_factory(metrics_target)
        prom.wait_for_scrapes(2)
        target = [t for t in prom.targets() if t["labels"].get("job") == "cxr-api"]
        assert target and target[0]["health"] == "up", target

        # phase 2: outcomes with the known confusion matrix, more predictions and requests
        for site, (tp, fn, tn, fp) in CONFUSION.items():
            for truth, decision, n in ((True, True, tp), (True, False, fn), (False, False, tn), (False, True, fp)):
                for _ in range(n):
                    m.record_outcome(site, MODEL_VERSION, truth, decision, delay_seconds=float(rng.uniform(3600, 86400)))
            for i in range(30, 40):
                _predict(rng, site, i)
        _traffic(2.0)
        n_outcomes = sum(sum(v) for v in CONFUSION.values())

        def complete():
            raw = prom.query(f'sum(cxr_outcomes_total{{model_version="{MODEL_VERSION}"}})')
            return bool(raw) and float(raw[0]["value"][1]) == n_outcomes
        prom.wait_until(complete, what="all outcomes scraped")
        prom.wait_for_scrapes(2)  # the rules have now been evaluated on the complete data

        # the raw counters are exactly the confusion matrix
        for site, (tp, fn, tn, fp) in CONFUSION.items():
            cells = {(dict(k)["truth"], dict(k)["decision"]): v
                     for k, v in prom.query_values(f'cxr_outcomes_total{{site="{site}"}}').items()}
            assert cells == {("positive", "positive"): tp, ("positive", "negative"): fn,
                             ("negative", "negative"): tn, ("negative", "positive"): fp}, site

        # recording rules: sensitivity / specificity / PPV / NPV / accuracy per site and version
        for window in ("1h", "1d", "7d"):
            for site, (tp, fn, tn, fp) in CONFUSION.items():
                sel = f'{{site="{site}",model_version="{MODEL_VERSION}"}}'
                expected = {"sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp), "ppv": tp / (tp + fp),
                            "npv": tn / (tn + fn), "accuracy": (tp + tn) / (tp + fn + tn + fp)}
                for name, value in expected.items():
                    got = prom.query_values(f"cxr:{name}:ratio{window}{sel}")
                    assert len(got) == 1, (name, window, site, got)
                    (got_value,) = got.values()
                    assert _close(got_value, value), (name, window, site, got_value, value)
        a = prom.query_values(f'cxr:sensitivity:ratio1h{{site="live-A",model_version="{MODEL_VERSION}"}}')
        assert _close(next(iter(a.values())), 0.9)
        a = prom.query_values(f'cxr:specificity:ratio1h{{site="live-A",model_version="{MODEL_VERSION}"}}')
        assert _close(next(iter(a.values())), 0.9)

        # every rule of the repo files is loaded and evaluates without error on real data
        rules = [r for g in prom.rule_groups() for r in g["rules"]]
        assert {r["name"] for r in rules if r["type"] == "alerting"} >= {
            "CXRSensitivityBelowPolicy", "CXRSpecificityBelowPolicy", "CXRNoOutcomesReceived", "CXRInputDrift",
            "CXRHighOutOfDistributionRate", "CXRApiDown", "CXRApiHighErrorRate", "CXRApiLatencyP99High",
            "CXRNoModelServed"}
        bad = [(r["name"], r.get("lastError")) for r in rules if r.get("health") == "err" or r.get("lastError")]
        assert not bad, bad

        # the low-sensitivity site (22 positives, 45 %) makes the policy alert pending; A and B do not
        def pending_sites():
            alerts = prom.api("alerts")["alerts"]
            return {a["labels"].get("site") for a in alerts if a["labels"]["alertname"] == "CXRSensitivityBelowPolicy"}
        assert prom.wait_until(lambda: "live-C" in pending_sites(), what="sensitivity alert for live-C")
        assert not pending_sites() & {"live-A", "live-B"}

        # drift gauges exported for every feature, in-distribution inputs stay below the alert line
        psi = {dict(k)["feature"]: v for k, v in
               prom.query_values(f'cxr_drift_psi{{model_version="{MODEL_VERSION}"}}').items()}
        assert set(psi) == set(VITAL_MEANS) | {"image_intensity"}
        assert all(v < m.PSI_ALERT_THRESHOLD for v in psi.values()), psi
        # ... and they are the monitor's own values: its window holds all 3 x 40 predictions of this test
        assert m.get_drift_monitor() is monitor
        assert monitor.samples() == {f: 120 for f in psi}, monitor.samples()
        local = monitor.psi_values()
        assert all(_close(psi[f], local[f]) for f in psi), (psi, local)
        ood = prom.query_values(f'cxr_drift_ood_fraction{{model_version="{MODEL_VERSION}"}}')
        assert len(ood) == 1 and _close(next(iter(ood.values())), 12 / 120), ood  # ood_score 0.95 for i % 10 == 0

        # every Grafana panel query (variables = All) returns data, and at least one real number
        bd = _load_dashboards()
        empty = []
        for name, dashboard in bd.build_all().items():
            for title, expr in bd.iter_exprs(dashboard):
                result = prom.query(bd.substitute_variables(expr))
                values = [float(r["value"][1]) for r in result]
                if not values or all(math.isnan(v) for v in values):
                    empty.append((name, title, expr))
        assert not empty, empty
    finally:
        m.configure_drift(None, MODEL_VERSION)
