"""Monitoring end to end: the real API (uvicorn subprocess) scraped by a real Prometheus (Debian package).

Everything runs on 127.0.0.1, nothing is mocked:

* a champion is built the way a hospital builds one (``pipelines.synth`` cohort -> ingest -> training of
  the small encoder -> governance approval with e-signature) in a subprocess with its own CXR_HOME, on
  enough patients that its stored drift reference is stable (the API tests' 40-patient model gives a
  reference too noisy for PSI);
* ``uvicorn app.main:app_factory`` serves it; Prometheus (the repo's ``prometheus.yml`` job ``cxr-api``
  and ``prometheus/rules/*.yml``, 1 s scrape/evaluation) scrapes its ``GET /metrics``;
* a fresh in-distribution synthetic cohort is sent through ``POST /v1/predictions`` (DICOM multipart,
  vitals JSON, ``site`` A or B) with a clinician token, and outcomes are posted through
  ``POST /v1/predictions/{id}/outcome`` choosing the truth for each returned decision so that the
  confusion matrix of each site is known;

and then:

1. the recording rules' sensitivity / specificity / PPV / NPV / accuracy per site and model version,
   read through Prometheus' HTTP API, equal the known values (1e-9) over every window, and the
   sensitivity alert is pending (``for: 15m``) for the low-sensitivity site only;
2. every PromQL expression of every panel (and annotation) of every committed Grafana dashboard
   returns data, with the template variables set to All (``.*``) and to each real value Prometheus
   lists for them;
3. drift: the in-distribution cohort leaves every ``cxr_drift_psi`` below the 0.2 alert threshold;
   the ``--variant omicron`` cohort, fed to a fresh server process (its own rolling window), raises it
   above 0.2 in the API's ``/metrics`` and the CXRInputDrift alert goes pending in Prometheus.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(Path(__file__).resolve().parent) not in sys.path:  # when run as a script (the champion build)
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from api_fixtures import PASSWORD, USERS, ApiEnv, Server  # noqa: E402
from prometheus_server import PrometheusServer, prometheus_binary  # noqa: E402

# Training cohort of the champion (patients): 800 patients give ~790 training images, so the drift
# reference stored with the model (deciles of each vital, pixel histogram) adds little noise to the PSI
# of a 200-sample window. The in-distribution PSI is dominated by the window itself (~150 present values
# per vital): over 200 random patient splits of this training cohort the largest in-distribution PSI
# of the 140-patient cohort below was 0.12 on average, 0.17 at the 99th percentile (threshold 0.2).
# The patient split is fixed here (fixed pseudonym key -> fixed keyed patient ids -> fixed split), so
# the reference, and therefore every PSI this test sees, is the same in every run.
TRAIN_PATIENTS = 800
PSEUDONYM_KEY = "monitoring-integration-test-key-not-a-secret"
IN_DIST_PATIENTS = 140   # -> <= 200 images: the whole cohort sits in the API's 200-sample drift window
VARIANT_PATIENTS = 100   # -> >= 100 images (the API exports PSI from 100 samples on)
IMAGE_ROWS = 128         # synthetic radiograph rows, as in the API tests
PSI_THRESHOLD = 0.2      # alerts.yml CXRInputDrift and app.metrics.PSI_ALERT_THRESHOLD
SITES = ("A", "B")
# site -> (TP, FN, TN, FP): A is a good site, B has a sensitivity of 10/22 with 22 confirmed positives
# (>= 20) -> CXRSensitivityBelowPolicy (< 0.70) must be pending for B only.
CONFUSION = {"A": (18, 2, 27, 3), "B": (10, 12, 25, 5)}
CLIENTS = 3
REQUEST_TIMEOUT = 120.0

pytestmark = pytest.mark.skipif(prometheus_binary() is None,
                                reason="prometheus binary not installed (apt-get install prometheus; `make test`)")


# ----------------------------------------------------------------------------------------------
# The champion: built in a subprocess (its own CXR_HOME, nothing leaks into this test process)
# ----------------------------------------------------------------------------------------------
def _build(base: Path) -> None:
    """Run in a subprocess: users, cohorts, ingest, training, approval; writes base/champion.json."""
    home, project = base / "home", base / "project"
    home.mkdir(parents=True, exist_ok=True)
    project.mkdir(parents=True, exist_ok=True)
    os.environ.update({"CXR_HOME": str(home), "CXR_PROJECT_ROOT": str(project), "CXR_USER": USERS["researcher"],
                       "CXR_PSEUDONYM_KEY": PSEUDONYM_KEY, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"})
    for k in ("MLFLOW_TRACKING_URI", "CXR_DATABASE_URL", "CXR_AUDIT_HMAC_KEY"):
        os.environ.pop(k, None)
    from compliance.approvals import approve_model_version
    from compliance.users import create_user, issue_token
    from models.train import train
    from pipelines.ingest import import_dataset
    from pipelines.synth import synthesize_cohort

    timings = {}
    t0 = time.perf_counter()
    for role, name in USERS.items():
        create_user(name, role, PASSWORD, full_name=f"Test {role.replace('_', ' ').title()}", actor="bootstrap",
                    sites=SITES if role in ("clinician", "admin") else None)
    synthesize_cohort(TRAIN_PATIENTS, base / "synth-train", seed=11, image_size=IMAGE_ROWS)
    # the cohorts sent through the API: same generator, other seeds (new patients)
    synthesize_cohort(IN_DIST_PATIENTS, base / "cohort-in", seed=21, image_size=IMAGE_ROWS)
    synthesize_cohort(VARIANT_PATIENTS, base / "cohort-omicron", seed=22, variant="omicron", image_size=IMAGE_ROWS)
    timings["synth_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    import_dataset(base / "synth-train", "moncohort", seed=11, actor=USERS["researcher"], track=False, quiet=True,
                   workers=2)
    timings["import_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = train("moncohort", epochs=1, image_size=64, encoder="small", batch_size=16, device="cpu", seed=7,
                   actor=USERS["researcher"], n_bootstrap=20, show_progress=False, num_workers=0)
    timings["train_s"] = time.perf_counter() - t0
    version = str(result["model_version"])
    approve_model_version(version, approver=USERS["approver"], password=PASSWORD,
                          reason="monitoring integration test champion (small synthetic model)",
                          override_policy_reason="CI model: 1 epoch on synthetic data cannot pass the release policy")
    tokens = {role: issue_token(name, actor=USERS["admin"]) for role, name in USERS.items()}
    (base / "champion.json").write_text(json.dumps({"version": version, "tokens": tokens, "timings": timings}))


@pytest.fixture(scope="module")
def champion(tmp_path_factory) -> ApiEnv:
    base = tmp_path_factory.mktemp("monitoring")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    log = base / "build.log"
    with open(log, "wb") as fh:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "build", str(base)], cwd=str(REPO),
                              env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, f"champion build failed:\n{log.read_text(errors='replace')[-4000:]}"
    info = json.loads((base / "champion.json").read_text())
    print(f"\nchampion v{info['version']} built: " + ", ".join(f"{k} {v:.1f}" for k, v in info["timings"].items()))
    api = ApiEnv(home=base / "home", project=base / "project", version=info["version"], tokens=info["tokens"])
    api.base = base  # type: ignore[attr-defined]
    return api


# ----------------------------------------------------------------------------------------------
# Sending a cohort through the API
# ----------------------------------------------------------------------------------------------
def _cohort(folder: Path) -> list[dict]:
    """[{filename, label, vitals (JSON-ready, only present fields)}] in file order."""
    import csv

    fields = ("temperature_c", "spo2_percent", "heart_rate_bpm", "respiratory_rate", "systolic_bp_mmhg",
              "age_years")
    out = []
    with open(folder / "vitals.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            vitals = {f: float(row[f]) for f in fields if row.get(f) not in (None, "")}
            vitals["sex"] = row["sex"]
            out.append({"path": folder / row["filename"], "label": row["label"], "vitals": vitals})
    return out


class Client:
    """Clinician HTTP client(s) for one server; ``predict_many`` sends with CLIENTS threads."""

    def __init__(self, server: Server, token: str) -> None:
        self.url = server.url
        self.headers = {"Authorization": f"Bearer {token}"}
        self._local = threading.local()
        self._lock = threading.Lock()
        self._clients: list = []

    def _client(self):
        import httpx

        c = getattr(self._local, "client", None)
        if c is None:
            c = self._local.client = httpx.Client(base_url=self.url, timeout=REQUEST_TIMEOUT, headers=self.headers)
            with self._lock:
                self._clients.append(c)
        return c

    def predict(self, item: dict, site: str) -> dict:
        r = self._client().post("/v1/predictions",
                                files={"image": (item["path"].name, item["path"].read_bytes(), "application/dicom")},
                                data={"vitals": json.dumps(item["vitals"]), "site": site})
        assert r.status_code == 200, (r.status_code, r.text[:500])
        body = r.json()
        assert body["model"]["version"] and body["decision"] in ("covid19-positive", "covid19-negative"), body
        return body

    def predict_many(self, jobs: list[tuple[dict, str]]) -> list[dict]:
        with ThreadPoolExecutor(CLIENTS) as pool:
            return list(pool.map(lambda job: self.predict(*job), jobs))

    def outcome(self, prediction_id: str, truth_positive: bool) -> None:
        r = self._client().post(f"/v1/predictions/{prediction_id}/outcome",
                                json={"rtpcr_result": "positive" if truth_positive else "negative"})
        assert r.status_code == 201, (r.status_code, r.text[:500])

    def metrics(self) -> dict[str, list]:
        from prometheus_client.parser import text_string_to_metric_families

        r = self._client().get("/metrics")
        assert r.status_code == 200
        return {fam.name: fam.samples for fam in text_string_to_metric_families(r.text)}

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for c in clients:
            c.close()


def _psi(metrics: dict[str, list], version: str) -> dict[str, float]:
    return {s.labels["feature"]: s.value for s in metrics.get("cxr_drift_psi", [])
            if s.labels["model_version"] == version}


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


# ----------------------------------------------------------------------------------------------
# The clinical run: server 1 + Prometheus 1, in-distribution cohort, known confusion matrices
# ----------------------------------------------------------------------------------------------
class Run:
    pass


@pytest.fixture(scope="module")
def clinical_run(champion, tmp_path_factory):
    run = Run()
    run.t0 = time.time()
    server = Server(champion, log=champion.base / "server-1.log")
    prom = PrometheusServer(f"127.0.0.1:{server.port}", tmp_path_factory.mktemp("prometheus-1"))
    client = Client(server, champion.tokens["clinician"])
    try:
        server.start()
        prom.start()
        prom.wait_for_scrapes(1)
        cohort = _cohort(champion.base / "cohort-in")
        assert 100 <= len(cohort) <= 200, len(cohort)
        # phase 1: the in-distribution cohort, sites alternating (this also creates the outcome cells at 0)
        t = time.perf_counter()
        jobs = [(item, SITES[i % 2]) for i, item in enumerate(cohort)]
        preds = client.predict_many(jobs)
        run.predict_seconds = time.perf_counter() - t
        run.n_cohort = len(cohort)
        run.in_dist_psi = _psi(client.metrics(), champion.version)  # the window now holds exactly this cohort
        served = {p["model"]["version"] for p in preds}
        assert served == {champion.version}, served

        # split each site's answers by decision; re-send inputs that gave a decision a site still lacks
        by_site: dict[str, dict[bool, list[str]]] = {s: {True: [], False: []} for s in SITES}
        example: dict[bool, list[dict]] = {True: [], False: []}
        for (item, site), p in zip(jobs, preds):
            positive = p["decision"] == "covid19-positive"
            by_site[site][positive].append(p["id"])
            example[positive].append(item)
        run.decision_mix = {s: (len(d[True]), len(d[False])) for s, d in by_site.items()}
        run.extra = 0
        for site, (tp, fn, tn, fp) in CONFUSION.items():
            for positive, need in ((True, tp + fp), (False, fn + tn)):
                short = need - len(by_site[site][positive])
                if short > 0:
                    assert example[positive], f"the champion never answered positive={positive}"
                    for k in range(short):
                        p = client.predict(example[positive][k % len(example[positive])], site)
                        assert (p["decision"] == "covid19-positive") == positive  # the model is deterministic
                        by_site[site][positive].append(p["id"])
                        run.extra += 1

        # phase 2: Prometheus has the four outcome cells of each site at 0 before any outcome arrives,
        # so increase() treats every cell of a site alike and the ratios are exact
        prom.wait_for_scrapes(2)
        for site, (tp, fn, tn, fp) in CONFUSION.items():
            pos, neg = by_site[site][True], by_site[site][False]
            for pid in pos[:tp]:
                client.outcome(pid, True)
            for pid in pos[tp:tp + fp]:
                client.outcome(pid, False)
            for pid in neg[:fn]:
                client.outcome(pid, True)
            for pid in neg[fn:fn + tn]:
                client.outcome(pid, False)
        n_outcomes = sum(sum(v) for v in CONFUSION.values())

        def complete():
            raw = prom.query(f'sum(cxr_outcomes_total{{job="cxr-api",model_version="{champion.version}"}})')
            return bool(raw) and float(raw[0]["value"][1]) == n_outcomes
        prom.wait_until(complete, timeout=30, what="all outcomes scraped")
        prom.wait_for_scrapes(3)  # rules evaluated (1 s) on the complete data
        run.server, run.prom, run.client, run.champion = server, prom, client, champion
        yield run
    finally:
        client.close()
        prom.stop()
        server.stop()


def test_recorded_performance_equals_known_confusion_matrix(clinical_run):
    run = clinical_run
    prom, version = run.prom, run.champion.version
    print(f"\nclinical run: {run.n_cohort} cohort predictions in {run.predict_seconds:.1f} s "
          f"({run.n_cohort / run.predict_seconds:.1f}/s), decisions (pos, neg) per site {run.decision_mix}, "
          f"{run.extra} extra predictions to fill the matrices")
    target = [t for t in prom.targets() if t["labels"].get("job") == "cxr-api"]
    assert len(target) == 1 and target[0]["health"] == "up", target
    assert target[0]["scrapeUrl"] == f"{run.server.url}/metrics"

    # the raw counters scraped from the API are exactly the confusion matrices
    for site, (tp, fn, tn, fp) in CONFUSION.items():
        raw = prom.query_values(f'cxr_outcomes_total{{job="cxr-api",site="{site}",model_version="{version}"}}')
        cells = {(dict(k)["truth"], dict(k)["decision"]): v for k, v in raw.items()}
        assert cells == {("positive", "positive"): tp, ("positive", "negative"): fn,
                         ("negative", "negative"): tn, ("negative", "positive"): fp}, (site, cells)

    measured = {}
    for window in ("1h", "1d", "7d"):
        for site, (tp, fn, tn, fp) in CONFUSION.items():
            expected = {"sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp), "ppv": tp / (tp + fp),
                        "npv": tn / (tn + fn), "accuracy": (tp + tn) / (tp + fn + tn + fp)}
            for name, value in expected.items():
                got = prom.query_values(f'cxr:{name}:ratio{window}{{site="{site}",model_version="{version}"}}')
                assert len(got) == 1, (name, window, site, got)
                (got_value,) = got.values()
                measured[(name, window, site)] = got_value
                assert _close(got_value, value), (name, window, site, got_value, value)
    print("recorded (1d): " + "; ".join(
        f"{site}: " + ", ".join(f"{n} {measured[(n, '1d', site)]:.4f}" for n in
                                ("sensitivity", "specificity", "ppv", "npv", "accuracy")) for site in CONFUSION))

    # every rule loaded from the repo files evaluates without error on the API's real metrics
    rules = [r for g in prom.rule_groups() for r in g["rules"]]
    assert len([r for r in rules if r["type"] == "recording"]) >= 33
    bad = [(r["name"], r.get("lastError")) for r in rules if r.get("health") == "err" or r.get("lastError")]
    assert not bad, bad

    # CXRSensitivityBelowPolicy (< 0.70 with >= 20 confirmed positives, for: 15m) is pending for B only;
    # the alert's value is B's recorded sensitivity. Specificity (A 0.90, B 0.83) raises nothing.
    def sens_alerts():
        return {a["labels"]["site"]: a for a in prom.alerts("CXRSensitivityBelowPolicy")}
    alerts = prom.wait_until(lambda: sens_alerts().get("B") and sens_alerts(), timeout=20,
                             what="CXRSensitivityBelowPolicy for site B")
    assert set(alerts) == {"B"}, alerts
    b = alerts["B"]
    assert b["state"] == "pending" and b["labels"]["model_version"] == version, b  # for: 15m not yet elapsed
    assert _close(float(b["value"]), 10 / 22), b["value"]
    assert not prom.alerts("CXRSpecificityBelowPolicy")
    firing = [a["labels"]["alertname"] for a in prom.alerts() if a["state"] == "firing"]
    assert not firing, firing


def _dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) of every panel target (rows walked) and annotation."""
    out = []

    def walk(name, panels):
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((name, panel.get("title", ""), target["expr"]))
            walk(name, panel.get("panels", []))

    for path in sorted((REPO / "grafana" / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        walk(path.name, dashboard.get("panels", []))
        for ann in dashboard.get("annotations", {}).get("list", []):
            if ann.get("expr"):
                out.append((path.name, f"annotation: {ann.get('name')}", ann["expr"]))
    return out


def _variables(path: Path) -> dict[str, str]:
    """Template variable name -> its ``label_values(selector, label)`` query."""
    dashboard = json.loads(path.read_text())
    out = {}
    for var in dashboard.get("templating", {}).get("list", []):
        q = var.get("query")
        out[var["name"]] = q.get("query") if isinstance(q, dict) else q
    return out


def _label_values(prom: PrometheusServer, query: str) -> list[str]:
    import re

    m = re.fullmatch(r"\s*label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*", query)
    assert m, f"unsupported variable query {query!r}"
    return prom.label_values(m.group(2), m.group(1))


def _substitute(expr: str, values: dict[str, str]) -> str:
    import re

    # $__rate_interval: Grafana uses max(4 x scrape interval, $__interval + scrape interval); the run is
    # minutes long with a 1 s scrape, so the dashboards' 1-minute-ish resolution is what a user sees
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s")
    for name, value in sorted(values.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    assert not re.search(r"\$\w", expr), f"unsubstituted variable in {expr}"
    return expr


def test_every_dashboard_query_returns_data(clinical_run):
    run = clinical_run
    prom = run.prom
    queries = _dashboard_queries()
    assert len(queries) >= 25, len(queries)
    files = sorted((REPO / "grafana" / "dashboards").glob("*.json"))
    assert {p.name for p in files} >= {"cxr-clinical.json", "cxr-drift.json", "cxr-operations.json"}
    empty, checked = [], 0
    for path in files:
        variables = _variables(path)
        real = {name: _label_values(prom, q) for name, q in variables.items()}
        for name, vals in real.items():  # every variable lists real values from the run
            assert vals, (path.name, name, variables[name])
        assert set(real.get("site", SITES)) >= set(SITES), real
        assert run.champion.version in real.get("model_version", [run.champion.version]), real
        # All (Grafana's allValue ".*"), then each real value of each variable (others at All)
        settings = [{n: ".*" for n in variables}]
        for name, vals in real.items():
            for v in vals:
                settings.append({**{n: ".*" for n in variables}, name: v})
        for _, title, expr in [q for q in queries if q[0] == path.name]:
            for values in settings:
                promql = _substitute(expr, values)
                result = prom.query(promql)
                finite = [float(r["value"][1]) for r in result if math.isfinite(float(r["value"][1]))]
                checked += 1
                if not result or not finite:
                    empty.append((path.name, title, promql, result))
            # as Grafana asks for a panel (range query over the dashboard's time range; here: the run)
            promql = _substitute(expr, settings[0])
            series = prom.query_range(promql, start=run.t0, end=time.time(), step=1)
            finite = [float(v) for s in series for _, v in s["values"] if math.isfinite(float(v))]
            checked += 1
            if not finite:
                empty.append((path.name, title, f"range: {promql}", series))
    assert not empty, "panels without data:\n" + "\n".join(map(str, empty))
    print(f"\n{len(queries)} dashboard queries, {checked} evaluations (instant with All and with every variable "
          "value, range with All): all return data")


def test_in_distribution_cohort_keeps_psi_below_threshold(clinical_run):
    run = clinical_run
    psi = run.in_dist_psi
    print(f"\nin-distribution PSI ({run.n_cohort} predictions in the window): "
          + ", ".join(f"{k} {v:.3f}" for k, v in sorted(psi.items())))
    assert set(psi) == {"temperature_c", "spo2_percent", "heart_rate_bpm", "respiratory_rate", "systolic_bp_mmhg",
                        "age_years", "image_intensity"}, psi
    assert max(psi.values()) < PSI_THRESHOLD, psi
    # Prometheus scraped the same gauges; no drift alert for the in-distribution traffic
    scraped = {dict(k)["feature"]: v for k, v in run.prom.query_values(
        f'cxr_drift_psi{{job="cxr-api",model_version="{run.champion.version}"}}').items()}
    assert set(scraped) == set(psi)
    if run.extra == 0:  # the window still holds exactly the cohort
        assert all(_close(scraped[f], psi[f]) for f in psi), (scraped, psi)
    # Whatever the window holds now (the cohort, plus any re-sent in-distribution inputs that filled the
    # confusion matrices), every scraped gauge is below the alert line, the rules have been evaluated on it
    # (the fixture waited for scrapes after the last prediction) and no drift alert is pending or firing.
    assert max(scraped.values()) < PSI_THRESHOLD, scraped
    drift_rule = [r for g in run.prom.rule_groups() for r in g["rules"] if r.get("name") == "CXRInputDrift"]
    assert len(drift_rule) == 1 and drift_rule[0]["health"] == "ok" and drift_rule[0]["state"] == "inactive", \
        drift_rule
    assert not run.prom.alerts("CXRInputDrift"), run.prom.alerts("CXRInputDrift")


def test_variant_cohort_raises_psi_above_alert_threshold(champion, clinical_run, tmp_path_factory):
    # a fresh server process = a fresh 200-sample drift window for the same champion
    server = Server(champion, log=champion.base / "server-2.log")
    prom = PrometheusServer(f"127.0.0.1:{server.port}", tmp_path_factory.mktemp("prometheus-2"))
    client = Client(server, champion.tokens["clinician"])
    try:
        server.start()
        prom.start()
        before = client.metrics()
        assert not _psi(before, champion.version), "a fresh process starts with an empty window"
        cohort = _cohort(champion.base / "cohort-omicron")
        assert 100 <= len(cohort) <= 200, len(cohort)
        t = time.perf_counter()
        client.predict_many([(item, "A") for item in cohort])
        seconds = time.perf_counter() - t
        psi = _psi(client.metrics(), champion.version)
        print(f"\nvariant (omicron) PSI ({len(cohort)} predictions in {seconds:.1f} s): "
              + ", ".join(f"{k} {v:.3f}" for k, v in sorted(psi.items())))
        assert len(psi) == 7, psi
        assert psi["image_intensity"] > PSI_THRESHOLD, psi
        shifted_vitals = {f: v for f, v in psi.items() if f != "image_intensity" and v > PSI_THRESHOLD}
        assert shifted_vitals, psi
        # ... and the drift alert of the repo's rules goes pending on the scraped gauge (for: 15m)
        alerts = prom.wait_until(lambda: prom.alerts("CXRInputDrift"), timeout=20, what="CXRInputDrift pending")
        features = {a["labels"]["feature"] for a in alerts}
        assert "image_intensity" in features and {a["state"] for a in alerts} == {"pending"}, alerts
        assert features == {f for f, v in psi.items() if v > PSI_THRESHOLD}, (features, psi)
    finally:
        client.close()
        prom.stop()
        server.stop()


if __name__ == "__main__":  # the champion build, run by the ``champion`` fixture in a subprocess
    if len(sys.argv) == 3 and sys.argv[1] == "build":
        _build(Path(sys.argv[2]))
    else:
        raise SystemExit(f"usage: {sys.argv[0]} build <dir>")
