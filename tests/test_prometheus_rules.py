"""The repo's Prometheus config, recording rules and alerts: promtool check + promtool unit tests,
every alert tested firing and not firing, thresholds consistent with the release policy."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PROM = REPO / "prometheus"
RULE_FILES = sorted((PROM / "rules").glob("*.yml"))
TEST_FILES = sorted((PROM / "tests").glob("*.yml"))
POLICY = REPO / "compliance" / "release_policy.yaml"

PROMTOOL = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package `prometheus`; `make test` installs it via system-deps)")


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def _alerts() -> dict[str, dict]:
    out = {}
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    out[rule["alert"]] = rule
    return out


def test_rule_and_test_files_exist():
    names = {p.name for p in RULE_FILES}
    assert {"recording.yml", "alerts.yml"} <= names
    assert TEST_FILES, "no promtool unit tests under prometheus/tests"


@needs_promtool
def test_promtool_check_config_and_rules():
    res = _promtool("check", "config", str(PROM / "prometheus.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    # check config also checks the rule files it names: make sure it found ours
    for path in RULE_FILES:
        assert path.name in res.stdout + res.stderr
    res = _promtool("check", "rules", *map(str, RULE_FILES))
    assert res.returncode == 0, res.stdout + res.stderr


@needs_promtool
def test_promtool_unit_tests_pass():
    res = _promtool("test", "rules", *map(str, TEST_FILES))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "FAILED" not in res.stdout + res.stderr


@needs_promtool
def test_promtool_unit_tests_can_fail(tmp_path):
    """The unit tests are not vacuous: the same tests against a broken sensitivity alert fail."""
    rules_dir = tmp_path / "rules"
    tests_dir = tmp_path / "tests"
    shutil.copytree(PROM / "rules", rules_dir)
    shutil.copytree(PROM / "tests", tests_dir)
    alerts = rules_dir / "alerts.yml"
    text = alerts.read_text()
    assert text.count("< 0.70 and") == 2
    alerts.write_text(text.replace("< 0.70 and", "< 0.40 and"))  # both windows
    # only the first (1-day window) group of the clinical tests: enough to catch it, and quick
    clinical = yaml.safe_load((tests_dir / "clinical_test.yml").read_text())
    clinical["tests"] = clinical["tests"][:1]
    (tests_dir / "clinical_test.yml").write_text(yaml.safe_dump(clinical))
    res = subprocess.run([PROMTOOL, "test", "rules", str(tests_dir / "clinical_test.yml")], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0 and "CXRSensitivityBelowPolicy" in res.stdout + res.stderr


def test_every_alert_is_unit_tested_firing_and_not_firing():
    firing: set[str] = set()
    silent: set[str] = set()
    for path in TEST_FILES:
        doc = yaml.safe_load(path.read_text())
        assert sorted(Path(path.parent, f).resolve() for f in doc["rule_files"]) == [p.resolve() for p in RULE_FILES], path
        for test in doc["tests"]:
            for case in test.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    alerts = set(_alerts())
    assert alerts, "no alerts found"
    assert alerts - firing == set(), f"alerts never tested firing: {alerts - firing}"
    assert alerts - silent == set(), f"alerts never tested silent: {alerts - silent}"


def test_alerts_are_documented_and_labelled():
    deployment = (REPO / "docs" / "DEPLOYMENT.md").read_text()
    assert re.search(r"^#+ Alerts", deployment, re.M), "docs/DEPLOYMENT.md needs an Alerts section (runbook anchor)"
    for name, rule in _alerts().items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"].get("summary"), name
        assert rule["annotations"].get("runbook") == "docs/DEPLOYMENT.md#alerts", name
        assert name in deployment, f"{name} not described in docs/DEPLOYMENT.md"


def _alert_threshold(name: str, metric: str) -> float:
    expr = _alerts()[name]["expr"]
    values = {float(v) for v in re.findall(rf"{re.escape(metric)}\S* < ([0-9.]+)", expr)}
    assert len(values) == 1, (name, expr, values)
    return values.pop()


def test_clinical_thresholds_are_the_documented_ones():
    # one number per alert, the same in both windows, and the one the comment at the top states
    text = (PROM / "rules" / "alerts.yml").read_text()
    sens = _alert_threshold("CXRSensitivityBelowPolicy", "cxr:sensitivity:ratio")
    spec = _alert_threshold("CXRSpecificityBelowPolicy", "cxr:specificity:ratio")
    assert f"is >= {sens:.2f}" in text and f"that same {sens:.2f}" in text
    assert f"specificity below {spec:.2f}" in text
    assert _alert_threshold("CXRSensitivityBelowPolicy", "cxr:sensitivity:ratio1d") == sens
    assert 0.5 <= spec < 1 and 0.5 <= sens < 1


def _policy_numbers(doc, path=()):
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _policy_numbers(value, (*path, str(key).lower()))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _policy_numbers(value, (*path, str(i)))
    elif isinstance(doc, (int, float)) and not isinstance(doc, bool):
        yield path, float(doc)


def test_sensitivity_alert_matches_release_policy():
    """The in-service alert uses the release policy's covid19 sensitivity lower bound."""
    if not POLICY.exists():
        pytest.skip(f"{POLICY.relative_to(REPO)} not written yet (governance)")
    doc = yaml.safe_load(POLICY.read_text())
    # policy 1.0.0: criteria: [{id: covid19-sensitivity-lower-bound, metric:
    # covid19_vs_rest.sensitivity.ci_low, op: ">=", threshold: 0.70}, ...]
    candidates = {float(c["threshold"]) for c in doc.get("criteria", [])
                  if isinstance(c, dict) and "sensitivity" in f"{c.get('id', '')} {c.get('metric', '')}"
                  and c.get("op", ">=") == ">=" and c.get("threshold") is not None}
    # or a numeric key whose own path names sensitivity (another layout)
    flat = [(".".join(p), v) for p, v in _policy_numbers(doc)]
    candidates |= {v for p, v in flat if "sensitivity" in p and 0 < v < 1}
    if not candidates:
        pytest.skip(f"no sensitivity criterion found in {POLICY.name}: {flat}")
    assert _alert_threshold("CXRSensitivityBelowPolicy", "cxr:sensitivity:ratio") in candidates, (
        f"alerts.yml sensitivity threshold differs from the release policy ({candidates}); update both "
        "prometheus/rules/alerts.yml and its tests, then `python grafana/build_dashboards.py`")
