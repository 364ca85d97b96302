"""Issue 15: the API serves only what an approver signed.

Attacker: someone with access to MLflow (no access control there) or to the model cache under
CXR_HOME — not the approver's password, not the audit key. On the session's real champion (real
training, real MLflow registry and artefact store, real FastAPI app; a real uvicorn process for the
restart case) they (1) move the ``champion`` alias in MLflow to a version nobody approved, (2) replace
an approved version's weights in the artefact store with a working but different network, and (3)
replace the weights in the model cache before a restart. Each time the API keeps serving the last
verified champion (or answers 503 when it has none), records ``model.serving_refused`` and raises
the metric behind ``CXRChampionVerificationFailed``, whose rule is then evaluated by promtool on the
scraped values.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from api_fixtures import REPO, api_env, free_port  # noqa: F401
from dicom_factory import make_dicom

PROMTOOL = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
VITALS = {"temperature_c": 38.4, "spo2_percent": 91, "heart_rate_bpm": 104, "age_years": 57, "sex": "F"}


@pytest.fixture(scope="module")
def served(api_env):  # noqa: F811
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.services.champion import ModelService

    svc = ModelService(poll_seconds=3600, retry_seconds=0)  # the test drives refresh(); no background switch
    app = create_app(model_service=svc)
    with TestClient(app, raise_server_exceptions=False) as c:
        assert svc.wait_ready(180), svc.last_error
        yield c, svc


def _client():
    from mlflow import MlflowClient

    from core.config import get_settings

    s = get_settings()
    return MlflowClient(tracking_uri=s.tracking_uri, registry_uri=s.tracking_uri)


def _predict(c, api_env):  # noqa: F811
    return c.post("/v1/predictions", headers=api_env.headers("clinician"),
                  files={"image": ("cxr.dcm", make_dicom(rows=128, cols=128), "application/dicom")},
                  data={"vitals": json.dumps(VITALS), "site": "site-a"})


def _metrics(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("cxr_champion_"):
                key = s.name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
                out[key] = s.value
    return out


def _refusals(version: str) -> list[dict]:
    from compliance.audit import list_events

    return [e["details"] for e in list_events(action="model.serving_refused") if e["details"]["version"] == version]


def _alert_fires(tmp: Path, scraped: dict[str, float]) -> bool:
    """Evaluate the repo's alert rule with promtool on a history that ends in the scraped values
    (everything 0 for five minutes, then what the API exported): True when the alert fires."""
    if PROMTOOL is None:
        pytest.skip("promtool not installed")
    series = []
    for key, value in scraped.items():
        name, _, labels = key.partition("{")
        labels = ("," + labels.rstrip("}")) if labels else ""
        if name.endswith("_created"):
            continue
        series.append({"series": f'{name}{{job="cxr-api",instance="api:8000"{labels}}}', "values": f"0x5 {value:g}x10"})
    import yaml

    rules = sorted(str(p) for p in (REPO / "prometheus" / "rules").glob("*.yml"))
    rule = [r for f in rules for g in yaml.safe_load(Path(f).read_text())["groups"] for r in g["rules"]
            if r.get("alert") == "CXRChampionVerificationFailed"][0]
    annotations = {k: v.replace("{{ $labels.instance }}", "api:8000") for k, v in rule["annotations"].items()}
    firing = {"rule_files": rules, "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series,
        "alert_rule_test": [{"eval_time": "8m", "alertname": "CXRChampionVerificationFailed", "exp_alerts": [
            {"exp_labels": {"severity": "critical", "category": "governance", "job": "cxr-api", "instance": "api:8000"},
             "exp_annotations": annotations}]}]}]}

    path = tmp / "fires_test.yml"
    path.write_text(yaml.safe_dump(firing))
    res = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    return res.returncode == 0


def _artifact_dir(version: str) -> Path:
    """Where the MLflow artefact store keeps the version's model files (a local file store here)."""
    from core.config import get_settings

    c = _client()
    mv = c.get_model_version(get_settings().registered_model_name, version)
    loc = mv.source
    if loc.startswith("models:/"):
        loc = c.get_logged_model(loc.rstrip("/").split("/")[-1]).artifact_location
    path = Path(unquote(urlparse(loc).path)) if loc.startswith("file:") else Path(loc)
    assert path.is_dir(), loc
    return path


def _backdoor(weights: Path) -> None:
    """Replace the weights with a working network that answers differently (a real attack, not junk bytes)."""
    import torch

    state = torch.load(weights, map_location="cpu", weights_only=True)
    last_bias = [k for k in state if k.endswith("bias")][-1]
    state[last_bias] = state[last_bias] + torch.tensor([5.0] + [0.0] * (state[last_bias].numel() - 1))
    torch.save(state, weights)


def test_alias_moved_in_mlflow_to_an_unapproved_version_is_not_served(served, api_env, tmp_path):  # noqa: F811
    from core.config import get_settings

    c, svc = served
    name = get_settings().registered_model_name
    verified = svc.current().version
    assert verified == api_env.version
    assert _metrics(c.get("/metrics").text)["cxr_champion_alias_unverified"] == 0
    assert not _alert_fires(tmp_path, _metrics(c.get("/metrics").text))

    mlf = _client()
    base = mlf.get_model_version(name, verified)
    rogue = mlf.create_model_version(name, source=base.source, run_id=base.run_id,
                                     tags={"status": "candidate", "trained_by": "mallory", "registered_by": "mallory"})
    rogue_v = str(rogue.version)
    mlf.set_registered_model_alias(name, "champion", rogue_v)  # no signature, straight through MLflow
    mlf.set_model_version_tag(name, rogue_v, "status", "approved")  # tags are not approvals either
    try:
        assert svc.refresh() is False
        assert svc.current().version == verified
        r = _predict(c, api_env)
        assert r.status_code == 200 and r.json()["model"]["version"] == verified
        refused = _refusals(rogue_v)
        assert len(refused) == 1 and refused[0]["reason"] == "no-approval"
        assert refused[0]["served_version"] == verified
        m = _metrics(c.get("/metrics").text)
        assert m["cxr_champion_alias_unverified"] == 1
        assert m['cxr_champion_verification_failures_total{reason="no-approval"}'] >= 1
        assert _alert_fires(tmp_path, m)
        # re-checked (by this refresh and by the poll thread): still refused, and still audited once
        assert svc.refresh() is False and len(_refusals(rogue_v)) == 1
        assert c.get("/readyz").status_code == 200  # still serving the verified champion
    finally:
        mlf.set_registered_model_alias(name, "champion", verified)
    assert svc.refresh() is False and svc.current().version == verified
    m = _metrics(c.get("/metrics").text)
    assert m["cxr_champion_alias_unverified"] == 0


def test_replaced_weights_in_the_artefact_store_are_not_served(served, api_env, tmp_path):  # noqa: F811
    from core.config import get_settings

    c, svc = served
    verified = svc.current().version
    new_v = api_env.new_champion(reason="re-release: same weights, signed digest")  # approved; alias moved by governance
    weights = next(_artifact_dir(new_v).rglob("weights.pt"))
    original = weights.read_bytes()
    cache = get_settings().state_dir / "model-cache" / get_settings().registered_model_name / new_v
    try:
        _backdoor(weights)
        assert svc.refresh() is False
        assert svc.current().version == verified
        assert _predict(c, api_env).json()["model"]["version"] == verified
        refused = _refusals(new_v)
        assert [d["reason"] for d in refused] == ["artifact-mismatch"]
        assert "digest" in refused[0]["message"]
        m = _metrics(c.get("/metrics").text)
        assert m["cxr_champion_alias_unverified"] == 1
        assert m['cxr_champion_verification_failures_total{reason="artifact-mismatch"}'] >= 1
        assert _alert_fires(tmp_path, m)
        # the store is repaired, but the model cache still holds the replaced files: still refused
        weights.write_bytes(original)
        assert cache.is_dir()
        assert svc.refresh() is False and svc.current().version == verified
    finally:
        weights.write_bytes(original)
        shutil.rmtree(cache, ignore_errors=True)
    # the signed files again: the approved version is published (the check is not a blanket refusal)
    assert svc.refresh() is True
    assert svc.current().version == new_v
    assert _predict(c, api_env).json()["model"]["version"] == new_v
    assert _metrics(c.get("/metrics").text)["cxr_champion_alias_unverified"] == 0


def test_replaced_weights_in_the_model_cache_block_a_restarted_api(served, api_env, tmp_path):  # noqa: F811
    """A real uvicorn process starts with the approved champion's cache tampered: it has no verified
    champion, so it answers 503 (never the replaced weights), audits and raises the metric."""
    import httpx

    from core.config import get_settings

    c, svc = served
    v = svc.current().version
    assert v == api_env.version
    cache = get_settings().state_dir / "model-cache" / get_settings().registered_model_name / v
    assert cache.is_dir()
    weights = next(cache.rglob("weights.pt"))
    original = weights.read_bytes()
    before = len(_refusals(v))
    port = free_port()
    log = tmp_path / "server.log"
    proc = None
    try:
        _backdoor(weights)
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:app_factory", "--factory", "--host",
                                 "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning"],
                                cwd=str(REPO), env=api_env.env(), stdout=open(log, "ab"), stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline, m = time.time() + 180, {}
        while time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                m = _metrics(httpx.get(url + "/metrics", timeout=2).text)
                if m.get("cxr_champion_alias_unverified") == 1:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert m.get("cxr_champion_alias_unverified") == 1, log.read_text()[-3000:]
        assert m['cxr_champion_verification_failures_total{reason="artifact-mismatch"}'] >= 1
        assert httpx.get(url + "/readyz", timeout=5).status_code == 503
        r = httpx.post(url + "/v1/predictions", headers=api_env.headers("clinician"), timeout=30,
                       files={"image": ("cxr.dcm", make_dicom(rows=128, cols=128), "application/dicom")},
                       data={"vitals": json.dumps(VITALS), "site": "site-a"})
        assert r.status_code == 503 and "failed serving verification" in r.json()["detail"]
        assert _alert_fires(tmp_path, m)
        refused = _refusals(v)[before:]
        assert refused and refused[0]["reason"] == "artifact-mismatch" and refused[0]["served_version"] is None
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
        weights.write_bytes(original)
    # the in-process API never stopped serving its verified copy
    assert _predict(c, api_env).json()["model"]["version"] == v
