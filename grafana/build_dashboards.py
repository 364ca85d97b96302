"""Generate the Grafana dashboards (``grafana/dashboards/*.json``) from code.

    python grafana/build_dashboards.py          # rewrite the JSON files
    python grafana/build_dashboards.py --check  # exit 1 if the committed JSON is out of date

The JSON is committed (Grafana provisions it from ``grafana/provisioning/dashboards``);
``tests/test_dashboards.py`` checks it is what this module generates and that every PromQL
expression parses, and ``tests/test_prometheus_live.py`` that every expression returns data
from a real Prometheus.

The policy lines drawn on the clinical panels (sensitivity / specificity) and the drift / OOD /
latency lines are read from ``prometheus/rules/alerts.yml`` so the dashboards always show the
thresholds that page someone. Only the standard library and PyYAML are used.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DASHBOARD_DIR = HERE / "dashboards"
ALERTS_FILE = REPO / "prometheus" / "rules" / "alerts.yml"
DATASOURCE = {"type": "prometheus", "uid": "cxr-prometheus"}  # provisioning/datasources/prometheus.yml
JOB = 'job="cxr-api"'

# What a panel's template variables stand for when an expression is checked outside Grafana.
VARIABLE_SUBSTITUTIONS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$site": ".*",
    "$model_version": ".*",
    "$feature": ".*",
}


def _alert_expr(name: str) -> str:
    doc = yaml.safe_load(ALERTS_FILE.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == name:
                return rule["expr"]
    raise KeyError(f"alert {name} not in {ALERTS_FILE}")


def _threshold(name: str, pattern: str) -> float:
    match = re.search(pattern, _alert_expr(name))
    if not match:
        raise ValueError(f"no threshold matching {pattern!r} in alert {name}")
    return float(match.group(1))


def thresholds() -> dict[str, float]:
    """The alert thresholds, read from prometheus/rules/alerts.yml."""
    return {
        "sensitivity_min": _threshold("CXRSensitivityBelowPolicy", r"cxr:sensitivity:ratio1d < ([0-9.]+)"),
        "specificity_min": _threshold("CXRSpecificityBelowPolicy", r"cxr:specificity:ratio1d < ([0-9.]+)"),
        "min_outcomes": _threshold("CXRSensitivityBelowPolicy", r"increase1d >= ([0-9.]+)"),
        "psi_max": _threshold("CXRInputDrift", r"\) > ([0-9.]+)"),
        "ood_fraction_max": _threshold("CXRHighOutOfDistributionRate", r"\) > ([0-9.]+)"),
        "latency_p99_max_s": _threshold("CXRApiLatencyP99High", r"\) > ([0-9.]+)\s*$"),
        "error_ratio_max": _threshold("CXRApiHighErrorRate", r"\) > ([0-9.]+)"),
    }


# ----------------------------------------------------------------------------------------------
# Panel helpers (Grafana dashboard JSON model, schemaVersion 39)
# ----------------------------------------------------------------------------------------------
class _Layout:
    def __init__(self) -> None:
        self.next_id = 1
        self.x = 0
        self.y = 0
        self.row_h = 0

    def place(self, w: int, h: int) -> dict[str, int]:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pos = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def new_row(self) -> None:
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0


def _targets(queries: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [
        {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend,
         "range": True, "instant": False}
        for i, (expr, legend) in enumerate(queries)
    ]


def _threshold_steps(line: float | None, good_above: bool) -> dict[str, Any]:
    if line is None:
        return {"mode": "absolute", "steps": [{"color": "green", "value": None}]}
    low, high = ("red", "green") if good_above else ("green", "red")
    return {"mode": "absolute", "steps": [{"color": low, "value": None}, {"color": high, "value": line}]}


def timeseries(layout: _Layout, title: str, description: str, queries: list[tuple[str, str]], *,
               unit: str = "short", line: float | None = None, good_above: bool = True,
               minimum: float | None = None, maximum: float | None = None, w: int = 12, h: int = 8,
               stack: bool = False) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": unit,
        "color": {"mode": "palette-classic"},
        "thresholds": _threshold_steps(line, good_above),
        "custom": {
            "drawStyle": "line", "lineWidth": 2, "fillOpacity": 10 if not stack else 60, "showPoints": "never",
            "spanNulls": True,
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
            "thresholdsStyle": {"mode": "dashed" if line is not None else "off"},
        },
    }
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    panel = {
        "id": layout.next_id, "type": "timeseries", "title": title, "description": description,
        "datasource": DATASOURCE, "gridPos": layout.place(w, h),
        "targets": _targets(queries),
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "showLegend": True,
                               "calcs": ["lastNotNull", "min", "max"]},
                    "tooltip": {"mode": "multi", "sort": "none"}},
    }
    layout.next_id += 1
    return panel


def stat(layout: _Layout, title: str, description: str, queries: list[tuple[str, str]], *, unit: str = "short",
         line: float | None = None, good_above: bool = True, w: int = 6, h: int = 5,
         decimals: int | None = None) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit, "thresholds": _threshold_steps(line, good_above),
                                "color": {"mode": "thresholds"}}
    if decimals is not None:
        defaults["decimals"] = decimals
    panel = {
        "id": layout.next_id, "type": "stat", "title": title, "description": description,
        "datasource": DATASOURCE, "gridPos": layout.place(w, h),
        "targets": _targets(queries),
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "background", "graphMode": "area", "textMode": "value_and_name",
                    "justifyMode": "auto", "orientation": "auto"},
    }
    layout.next_id += 1
    return panel


def state_timeline(layout: _Layout, title: str, description: str, queries: list[tuple[str, str]], *,
                   w: int = 24, h: int = 6) -> dict[str, Any]:
    panel = {
        "id": layout.next_id, "type": "state-timeline", "title": title, "description": description,
        "datasource": DATASOURCE, "gridPos": layout.place(w, h),
        "targets": _targets(queries),
        "fieldConfig": {"defaults": {"color": {"mode": "palette-classic"},
                                     "custom": {"fillOpacity": 80, "lineWidth": 0},
                                     "mappings": [{"type": "value", "options": {"1": {"text": "serving"}}}],
                                     "thresholds": _threshold_steps(None, True)},
                        "overrides": []},
        "options": {"showValue": "never", "mergeValues": True, "rowHeight": 0.8,
                    "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
    }
    layout.next_id += 1
    return panel


def row(layout: _Layout, title: str) -> dict[str, Any]:
    layout.new_row()
    panel = {"id": layout.next_id, "type": "row", "title": title, "collapsed": False,
             "gridPos": {"x": 0, "y": layout.y, "w": 24, "h": 1}, "panels": []}
    layout.next_id += 1
    layout.y += 1
    return panel


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name, "label": label, "type": "query", "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-var"}, "definition": query,
        "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1, "hide": 0, "options": [],
    }


def _dashboard(uid: str, title: str, description: str, panels: list[dict[str, Any]], *,
               variables: list[dict[str, Any]], time_from: str = "now-7d", tags: list[str] | None = None) -> dict[str, Any]:
    return {
        "uid": uid, "title": title, "description": description,
        "tags": ["cxr", *(tags or [])], "timezone": "utc", "editable": False, "graphTooltip": 1,
        "schemaVersion": 39, "version": 1, "refresh": "1m",
        "time": {"from": time_from, "to": "now"},
        "templating": {"list": variables},
        "annotations": {"list": [
            {"name": "Model version switches", "datasource": DATASOURCE, "enable": True,
             "iconColor": "purple",
             # one annotation per version, at the time the API started serving it (value = ms)
             "expr": f"max by (model_version) (cxr_model_loaded_timestamp_seconds{{{JOB}}}) * 1000",
             "useValueForTime": True, "titleFormat": "model {{model_version}} loaded", "step": "1m"},
        ]},
        "links": [], "panels": panels,
    }


# ----------------------------------------------------------------------------------------------
# Dashboards
# ----------------------------------------------------------------------------------------------
SEL = f'{JOB},site=~"$site",model_version=~"$model_version"'
RSEL = 'site=~"$site",model_version=~"$model_version"'  # recording rules have no job label


def clinical_dashboard(t: dict[str, float]) -> dict[str, Any]:
    L = _Layout()
    sens, spec, n_min = t["sensitivity_min"], t["specificity_min"], int(t["min_outcomes"])
    panels = [
        row(L, "Clinical performance from confirmed outcomes (per site and model version)"),
        stat(L, "Sensitivity, last 7 days", f"TP / (TP + FN) over 7 days. Red below the release policy's {sens}.",
             [(f"cxr:sensitivity:ratio7d{{{RSEL}}}", "{{site}} v{{model_version}}")],
             unit="percentunit", line=sens, decimals=1),
        stat(L, "Specificity, last 7 days", f"TN / (TN + FP) over 7 days. Red below {spec}.",
             [(f"cxr:specificity:ratio7d{{{RSEL}}}", "{{site}} v{{model_version}}")],
             unit="percentunit", line=spec, decimals=1),
        stat(L, "Confirmed positives, last 7 days",
             f"Number of confirmed COVID-19 outcomes (TP + FN). Alerts need at least {n_min} in the window.",
             [(f"cxr:outcomes_truth_positive:increase7d{{{RSEL}}}", "{{site}} v{{model_version}}")],
             line=n_min, decimals=0),
        stat(L, "Confirmed negatives, last 7 days",
             f"Number of confirmed non-COVID outcomes (TN + FP). Alerts need at least {n_min} in the window.",
             [(f"cxr:outcomes_truth_negative:increase7d{{{RSEL}}}", "{{site}} v{{model_version}}")],
             line=n_min, decimals=0),
        timeseries(L, "Sensitivity (1-day window)",
                   f"Rolling 1-day sensitivity per site and model version; dashed line = release policy minimum {sens} "
                   f"(alert CXRSensitivityBelowPolicy when below with >= {n_min} confirmed positives).",
                   [(f"cxr:sensitivity:ratio1d{{{RSEL}}}", "{{site}} v{{model_version}}")],
                   unit="percentunit", line=sens, minimum=0, maximum=1),
        timeseries(L, "Specificity (1-day window)",
                   f"Rolling 1-day specificity; dashed line = alert threshold {spec}.",
                   [(f"cxr:specificity:ratio1d{{{RSEL}}}", "{{site}} v{{model_version}}")],
                   unit="percentunit", line=spec, minimum=0, maximum=1),
        timeseries(L, "PPV and NPV (1-day window)", "Positive and negative predictive value at the operating threshold.",
                   [(f"cxr:ppv:ratio1d{{{RSEL}}}", "PPV {{site}} v{{model_version}}"),
                    (f"cxr:npv:ratio1d{{{RSEL}}}", "NPV {{site}} v{{model_version}}")],
                   unit="percentunit", minimum=0, maximum=1),
        timeseries(L, "Accuracy (1-day window)", "(TP + TN) / all confirmed outcomes.",
                   [(f"cxr:accuracy:ratio1d{{{RSEL}}}", "{{site}} v{{model_version}}")],
                   unit="percentunit", minimum=0, maximum=1),
        timeseries(L, "Sensitivity and specificity (7-day window)", "Slower, steadier view for low-volume sites.",
                   [(f"cxr:sensitivity:ratio7d{{{RSEL}}}", "sensitivity {{site}} v{{model_version}}"),
                    (f"cxr:specificity:ratio7d{{{RSEL}}}", "specificity {{site}} v{{model_version}}")],
                   unit="percentunit", line=sens, minimum=0, maximum=1),
        timeseries(L, "Confusion matrix (outcomes per hour)", "Confirmed outcomes in the last hour by truth and decision.",
                   [(f"cxr:outcomes:increase1h{{{RSEL}}}", "{{site}} v{{model_version}} truth={{truth}} decision={{decision}}")],
                   minimum=0),
        row(L, "Outcome feedback"),
        timeseries(L, "Outcomes recorded per hour", "Rate of outcome recording per site (no outcomes = blind monitoring).",
                   [(f"sum by (site) (rate(cxr_outcomes_total{{{SEL}}}[$__rate_interval])) * 3600", "{{site}}")],
                   unit="short", minimum=0),
        timeseries(L, "Delay from prediction to outcome (p50, p90)", "How long confirmed diagnoses take to come back.",
                   [(f"histogram_quantile(0.5, sum by (le, site) (rate(cxr_outcome_delay_seconds_bucket{{{SEL}}}[$__rate_interval])))", "p50 {{site}}"),
                    (f"histogram_quantile(0.9, sum by (le, site) (rate(cxr_outcome_delay_seconds_bucket{{{SEL}}}[$__rate_interval])))", "p90 {{site}}")],
                   unit="s", minimum=0),
    ]
    return _dashboard("cxr-clinical", "CXR - clinical performance",
                      "Sensitivity, specificity, PPV/NPV and accuracy of the served COVID-19 model from confirmed "
                      "outcomes, per site and model version, with the release policy thresholds.",
                      panels, variables=[_variable("site", "Site", f"label_values(cxr_outcomes_total{{{JOB}}}, site)"),
                                         _variable("model_version", "Model version",
                                                   f"label_values(cxr_outcomes_total{{{JOB}}}, model_version)")],
                      tags=["clinical"])


def drift_dashboard(t: dict[str, float]) -> dict[str, Any]:
    L = _Layout()
    mv = f'{JOB},model_version=~"$model_version"'
    panels = [
        row(L, "Input drift vs the model's training reference"),
        timeseries(L, "PSI per input feature",
                   f"Population stability index of the last predictions vs the training split (vitals and image "
                   f"intensity). Dashed line: alert threshold {t['psi_max']}.",
                   [(f'cxr_drift_psi{{{mv},feature=~"$feature"}}', "{{feature}} v{{model_version}}")],
                   line=t["psi_max"], good_above=False, minimum=0, w=16),
        stat(L, "Worst PSI now", "Largest PSI over all features.",
             [(f"max(cxr_drift_psi{{{mv}}})", "max PSI")], line=t["psi_max"], good_above=False, w=8, decimals=3),
        timeseries(L, "Out-of-distribution fraction (rolling window)",
                   f"Share of the rolling window above the model's OOD threshold; alert above {t['ood_fraction_max']}.",
                   [(f"cxr_drift_ood_fraction{{{mv}}}", "v{{model_version}}")],
                   unit="percentunit", line=t["ood_fraction_max"], good_above=False, minimum=0),
        timeseries(L, "Out-of-distribution rate (per site)", "OOD predictions / all predictions, per site.",
                   [(f'sum by (site) (rate(cxr_ood_predictions_total{{{mv},site=~"$site"}}[$__rate_interval])) / '
                     f'sum by (site) (rate(cxr_predictions_total{{{mv},site=~"$site"}}[$__rate_interval]))', "{{site}}")],
                   unit="percentunit", line=t["ood_fraction_max"], good_above=False, minimum=0),
        timeseries(L, "Drift window fill", "Values in each feature's rolling window (PSI is exported once it is full enough).",
                   [(f'cxr_drift_window_samples{{{mv},feature=~"$feature"}}', "{{feature}}")], minimum=0),
        timeseries(L, "Input warnings per hour by kind", "Warnings returned with predictions (AP supine, missing vitals, age < 18, OOD...).",
                   [(f"sum by (kind) (rate(cxr_input_warnings_total{{{JOB}}}[$__rate_interval])) * 3600", "{{kind}}")],
                   minimum=0),
    ]
    return _dashboard("cxr-drift", "CXR - input drift", "Input drift (PSI) and out-of-distribution inputs vs the served model's reference.",
                      panels, variables=[
                          _variable("model_version", "Model version", f"label_values(cxr_drift_psi{{{JOB}}}, model_version)"),
                          _variable("feature", "Feature", f"label_values(cxr_drift_psi{{{JOB}}}, feature)"),
                          _variable("site", "Site", f"label_values(cxr_predictions_total{{{JOB}}}, site)")],
                      time_from="now-2d", tags=["drift"])


def operations_dashboard(t: dict[str, float]) -> dict[str, Any]:
    L = _Layout()
    panels = [
        row(L, "Model in service"),
        state_timeline(L, "Model version timeline", "Which model version the API served, over time.",
                       [(f"max by (model_version) (cxr_model_info{{{JOB}}})", "v{{model_version}}")]),
        stat(L, "API up", "Prometheus can scrape the API (1 = up).", [(f"min(up{{{JOB}}})", "up")], line=1, w=6),
        stat(L, "Served model version", "Current champion and its approval time (label approved_at).",
             [(f"max by (model_version, approved_at) (cxr_model_info{{{JOB}}})", "v{{model_version}} approved {{approved_at}}")],
             w=18),
        row(L, "Prediction mix"),
        timeseries(L, "Predictions per hour by class", "Arg-max class of served predictions.",
                   [(f'sum by (predicted_class) (rate(cxr_predictions_total{{{JOB},site=~"$site"}}[$__rate_interval])) * 3600',
                     "{{predicted_class}}")], minimum=0, stack=True),
        timeseries(L, "COVID-19 positive decision share by site", "Share of predictions with a positive decision at the operating threshold.",
                   [(f'sum by (site) (rate(cxr_predictions_total{{{JOB},site=~"$site",decision="positive"}}[$__rate_interval])) / '
                     f'sum by (site) (rate(cxr_predictions_total{{{JOB},site=~"$site"}}[$__rate_interval]))', "{{site}}")],
                   unit="percentunit", minimum=0, maximum=1),
        timeseries(L, "Predictions per hour by model version and site", "Traffic per model version (shows the switch-over).",
                   [(f'sum by (model_version, site) (rate(cxr_predictions_total{{{JOB},site=~"$site"}}[$__rate_interval])) * 3600',
                     "v{{model_version}} {{site}}")], minimum=0, w=24),
        row(L, "API latency and errors"),
        timeseries(L, "Requests per second by route and status", "All API requests by route template and status code.",
                   [(f"sum by (route, status) (rate(cxr_http_requests_total{{{JOB}}}[$__rate_interval]))", "{{route}} {{status}}")],
                   unit="reqps", minimum=0),
        # "or vector(0)": an API that served requests without any 5xx shows 0 %, not "No data"
        timeseries(L, "5xx error ratio", f"Share of requests ending in a 5xx; alert above {t['error_ratio_max']}.",
                   [(f'(sum(rate(cxr_http_requests_total{{{JOB},status=~"5.."}}[$__rate_interval])) or vector(0)) / '
                     f"sum(rate(cxr_http_requests_total{{{JOB}}}[$__rate_interval]))", "5xx ratio")],
                   unit="percentunit", line=t["error_ratio_max"], good_above=False, minimum=0),
        timeseries(L, "Latency p50 / p99 by route", f"Request latency quantiles; dashed line: p99 alert {t['latency_p99_max_s']} s.",
                   [(f"histogram_quantile(0.5, sum by (le, route) (rate(cxr_http_request_duration_seconds_bucket{{{JOB}}}[$__rate_interval])))", "p50 {{route}}"),
                    (f"histogram_quantile(0.99, sum by (le, route) (rate(cxr_http_request_duration_seconds_bucket{{{JOB}}}[$__rate_interval])))", "p99 {{route}}")],
                   unit="s", line=t["latency_p99_max_s"], good_above=False, minimum=0, w=24),
    ]
    return _dashboard("cxr-operations", "CXR - operations",
                      "The hospital API: model version timeline, prediction mix, request rate, errors and latency.",
                      panels, variables=[_variable("site", "Site", f"label_values(cxr_predictions_total{{{JOB}}}, site)")],
                      time_from="now-24h", tags=["operations"])


def build_all() -> dict[str, dict[str, Any]]:
    """File name → dashboard JSON model."""
    t = thresholds()
    return {
        "cxr-clinical.json": clinical_dashboard(t),
        "cxr-drift.json": drift_dashboard(t),
        "cxr-operations.json": operations_dashboard(t),
    }


def render(dashboard: dict[str, Any]) -> str:
    return json.dumps(dashboard, indent=2, sort_keys=True) + "\n"


def iter_exprs(dashboard: dict[str, Any]):
    """(panel title, PromQL) for every query of every panel, nested rows and annotations included."""
    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                yield panel.get("title", ""), target["expr"]
            yield from walk(panel.get("panels", []))
    yield from walk(dashboard.get("panels", []))
    for ann in dashboard.get("annotations", {}).get("list", []):
        if ann.get("expr"):
            yield f"annotation: {ann['name']}", ann["expr"]


def substitute_variables(expr: str) -> str:
    """The expression as Grafana would send it with every variable set to All."""
    for name in sorted(VARIABLE_SUBSTITUTIONS, key=len, reverse=True):
        expr = expr.replace(name, VARIABLE_SUBSTITUTIONS[name])
    return expr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON differs")
    args = parser.parse_args(argv)
    DASHBOARD_DIR.mkdir(parents=True, exist_ok=True)
    stale = []
    for name, dashboard in build_all().items():
        path = DASHBOARD_DIR / name
        text = render(dashboard)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")
    if stale:
        print("out of date (run python grafana/build_dashboards.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
