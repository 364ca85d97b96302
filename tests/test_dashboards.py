"""Grafana dashboards: committed JSON = generator output; every query parses (promtool) and names
only metrics the app exports or the rules record; provisioning matches the panels' datasource."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
GRAFANA = REPO / "grafana"
PROMTOOL = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)


def _builder():
    spec = importlib.util.spec_from_file_location("build_dashboards", GRAFANA / "build_dashboards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bd():
    return _builder()


def test_committed_json_is_up_to_date(bd):
    generated = bd.build_all()
    on_disk = {p.name for p in (GRAFANA / "dashboards").glob("*.json")}
    assert on_disk == set(generated), "dashboards/ holds files the generator does not make (or misses some)"
    for name, dashboard in generated.items():
        assert (GRAFANA / "dashboards" / name).read_text() == bd.render(dashboard), (
            f"{name} is stale: run `python grafana/build_dashboards.py`")
    assert bd.main(["--check"]) == 0


def test_dashboards_cover_the_required_views(bd):
    titles = " | ".join(p["title"] for d in bd.build_all().values() for p in d["panels"]).lower()
    for needle in ("sensitivity", "specificity", "ppv", "psi", "out-of-distribution", "predictions per hour by class",
                   "latency", "5xx", "model version timeline"):
        assert needle in titles, needle


def test_policy_thresholds_are_drawn(bd):
    t = bd.thresholds()
    clinical = bd.build_all()["cxr-clinical.json"]
    panel = next(p for p in clinical["panels"] if p["title"] == "Sensitivity (1-day window)")
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[-1]["value"] == t["sensitivity_min"] == 0.7
    assert panel["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] in ("line", "dashed", "line+area")
    panel = next(p for p in clinical["panels"] if p["title"] == "Specificity (1-day window)")
    assert panel["fieldConfig"]["defaults"]["thresholds"]["steps"][-1]["value"] == t["specificity_min"]
    drift = bd.build_all()["cxr-drift.json"]
    panel = next(p for p in drift["panels"] if p["title"] == "PSI per input feature")
    assert panel["fieldConfig"]["defaults"]["thresholds"]["steps"][-1]["value"] == t["psi_max"] == 0.2


def test_panels_are_well_formed_and_use_the_provisioned_datasource(bd):
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "dashboards.yml").read_text())["providers"]
    assert providers and providers[0]["type"] == "file"
    uids = set()
    for name, dashboard in bd.build_all().items():
        assert dashboard["uid"] not in uids
        uids.add(dashboard["uid"])
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), name
        for panel in dashboard["panels"]:
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24, (name, panel["title"])
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": ds["uid"]}, (name, panel["title"])
            assert panel["targets"], (name, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == ds["uid"]
                assert target["expr"].strip()


def _known_series() -> set[str]:
    from app import metrics as m

    names = set()
    for family in m.REGISTRY.collect():
        base = family.name
        if family.type == "counter":
            names |= {base + "_total"}
        elif family.type == "histogram":
            names |= {base + "_bucket", base + "_count", base + "_sum"}
        else:
            names.add(base)
    for path in (REPO / "prometheus" / "rules").glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            names |= {r["record"] for r in group["rules"] if "record" in r}
    return names | {"up"}


def test_queries_name_only_exported_or_recorded_series(bd):
    known = _known_series()
    unknown = set()
    for dashboard in bd.build_all().values():
        exprs = [e for _, e in bd.iter_exprs(dashboard)]
        exprs += [v["query"]["query"] for v in dashboard["templating"]["list"]]
        for expr in exprs:
            for name in re.findall(r"\b(cxr[_:][A-Za-z0-9_:]+|up)\b(?=\s*[{\[(),]|\s*$|\s)", expr):
                if name not in known:
                    unknown.add(name)
    assert not unknown, f"dashboards query series nobody exports or records: {unknown}"


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (`make test` installs the prometheus package)")
def test_every_query_parses_with_promtool(bd, tmp_path):
    rules = []
    for name, dashboard in bd.build_all().items():
        for i, (title, expr) in enumerate(bd.iter_exprs(dashboard)):
            rules.append({"record": f"dashboard_check:{name.split('.')[0].replace('-', '_')}:{i}",
                          "expr": bd.substitute_variables(expr)})
        for var in dashboard["templating"]["list"]:
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"])
            assert match, var["query"]
            rules.append({"record": f"dashboard_check:{name.split('.')[0].replace('-', '_')}:var_{var['name']}",
                          "expr": match.group(1)})
    leftovers = [r["expr"] for r in rules if "$" in r["expr"]]
    assert not leftovers, f"template variables without a substitution: {leftovers}"
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}))
    res = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(rules)} rules found" in res.stdout + res.stderr
