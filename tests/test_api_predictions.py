"""Hospital API happy path, in process (FastAPI TestClient) on the session's real champion."""
from __future__ import annotations

import io
import json

import pytest
from api_fixtures import api_env, started_client  # noqa: F401
from dicom_factory import make_dicom

pytestmark = pytest.mark.app_databases  # the session's API environment on SQLite and on PostgreSQL

VITALS = {"temperature_c": 38.4, "spo2_percent": 91, "heart_rate_bpm": 104, "respiratory_rate": 24,
          "systolic_bp_mmhg": 118, "age_years": 57, "sex": "F"}


@pytest.fixture(scope="module")
def client(api_env):  # noqa: F811
    with started_client() as c:
        yield c


def _predict(client, api_env, *, vitals=VITALS, accept=None, site="site-a", **dicom):  # noqa: F811
    headers = api_env.headers("clinician")
    if accept:
        headers["Accept"] = accept
    return client.post("/v1/predictions", headers=headers,
                       files={"image": ("cxr.dcm", make_dicom(rows=128, cols=128, **dicom), "application/dicom")},
                       data={"vitals": json.dumps(vitals), "site": site, "accession": "ACC-000123"})


def test_predict_json(client, api_env):  # noqa: F811
    from compliance.audit import list_events

    r = _predict(client, api_env)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["version"] == api_env.version
    assert set(body["probabilities"]) == {"covid19", "other_pneumonia", "normal"}
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-4
    assert body["p_covid19"] == pytest.approx(body["probabilities"]["covid19"])
    assert body["decision"] == ("covid19-positive" if body["p_covid19"] >= body["operating_threshold"]
                                else "covid19-negative")
    # presence flags only: every vital field sent (and sex) is flagged present, nothing else is there
    sent_fields = ("temperature_c", "spo2_percent", "heart_rate_bpm", "respiratory_rate", "systolic_bp_mmhg",
                   "age_years", "sex")
    assert set(sent_fields) <= set(VITALS)
    assert body["vitals_present"] == {f: True for f in sent_fields}, body["vitals_present"]
    codes = {w["code"] for w in body["warnings"]}
    assert "vitals-missing" not in codes and "age-under-18" not in codes
    # stored without PHI: the accession only as a keyed hash; vitals only as presence flags
    from app.storage import get_prediction

    row = get_prediction(body["id"])
    assert row is not None and row["accession_hash"] and "ACC-000123" not in json.dumps(row)
    assert "38.4" not in json.dumps(row)
    served = [e for e in list_events(action="prediction.served") if e["details"]["prediction_id"] == body["id"]]
    assert served and served[0]["details"]["model_version"] == api_env.version
    assert "ACC-000123" not in json.dumps(list_events())


def test_predict_warnings(client, api_env):  # noqa: F811
    r = _predict(client, api_env, vitals={"age_years": 9}, view=None)
    assert r.status_code == 200, r.text
    codes = {w["code"] for w in r.json()["warnings"]}
    assert {"vitals-missing", "age-under-18", "view-missing"} <= codes
    # only age was sent: every other vital (and sex) is flagged absent
    assert r.json()["vitals_present"] == {"temperature_c": False, "spo2_percent": False, "heart_rate_bpm": False,
                                          "respiratory_rate": False, "systolic_bp_mmhg": False, "age_years": True,
                                          "sex": False}, r.json()["vitals_present"]
    flat = make_dicom(rows=128, cols=128, pixels=__import__("numpy").full((128, 128), 2000, dtype="uint16"))
    r = client.post("/v1/predictions", headers=api_env.headers("clinician"),
                    files={"image": ("flat.dcm", flat, "application/dicom")}, data={"vitals": json.dumps(VITALS)})
    assert r.status_code == 200, r.text
    assert "low-image-quality" in {w["code"] for w in r.json()["warnings"]}


def test_predict_fhir_validates(client, api_env):  # noqa: F811
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    r = _predict(client, api_env, accept="application/fhir+json")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    report = DiagnosticReport.model_validate(r.json())
    assert report.id and len(report.result) >= 5
    kinds = {c.get_resource_type() for c in report.contained}
    assert {"Observation", "Device"} <= kinds
    assert api_env.version in r.text

    # the FHIR content is the stored prediction: compare with GET /v1/predictions/{id} (plain JSON)
    fhir = r.json()
    assert fhir["identifier"][0]["value"] == fhir["id"]
    got = client.get(f"/v1/predictions/{fhir['id']}", headers=api_env.headers("clinician"))
    assert got.status_code == 200, got.text
    stored = got.json()
    contained = {c["id"]: c for c in fhir["contained"]}
    assert sorted(ref["reference"] for ref in fhir["result"]) == sorted(
        f"#{cid}" for cid, c in contained.items() if c["resourceType"] == "Observation")

    def value(obs_id: str) -> float:
        obs = contained[obs_id]
        assert obs["resourceType"] == "Observation" and obs["status"] == "final", obs
        assert obs["device"] == {"reference": "#model"}, obs
        q = obs["valueQuantity"]
        assert q["unit"] == "probability" and q["code"] == "1", q
        return float(q["value"])

    assert contained["p-covid19"]["code"]["coding"][0]["code"] == "p-covid19"
    assert value("p-covid19") == pytest.approx(stored["p_covid19"], abs=1e-6)
    assert set(stored["probabilities"]) == {"covid19", "other_pneumonia", "normal"}
    for cls, p in stored["probabilities"].items():
        obs_id = f"prob-{cls.replace('_', '-')}"
        assert contained[obs_id]["code"]["coding"][0]["code"] == f"probability-{cls}"
        assert value(obs_id) == pytest.approx(p, abs=1e-6), cls
    decision = contained["decision"]
    assert decision["code"]["coding"][0]["code"] == "covid19-decision"
    concept = decision["valueCodeableConcept"]
    assert concept["text"] == stored["decision"]
    assert concept["coding"][0]["code"] == ("POS" if stored["decision"] == "covid19-positive" else "NEG")
    assert f"{stored['operating_threshold']:.4f}" in decision["method"]["text"]
    device = contained["model"]
    assert device["resourceType"] == "Device"
    assert device["version"] == [{"value": str(stored["model"]["version"])}]
    assert stored["model"]["version"] == api_env.version
    assert device["deviceName"][0]["name"] == stored["model"]["name"]


def test_get_prediction_heatmap_and_outcome(client, api_env):  # noqa: F811
    from PIL import Image

    from compliance.audit import list_events

    r = _predict(client, api_env)
    pid = r.json()["id"]
    got = client.get(f"/v1/predictions/{pid}", headers=api_env.headers("clinician"))
    assert got.status_code == 200 and got.json()["id"] == pid and got.json()["outcome"] is None

    hm = client.get(f"/v1/predictions/{pid}/heatmap", headers=api_env.headers("clinician"))
    assert hm.status_code == 200 and hm.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(hm.content))
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (256, 256)

    url = f"/v1/predictions/{pid}/outcome"
    first = client.post(url, headers=api_env.headers("clinician"), json={"rtpcr_result": "positive"})
    assert first.status_code == 201, first.text
    again = client.post(url, headers=api_env.headers("clinician"), json={"rtpcr_result": "positive"})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]  # idempotent
    other = client.post(url, headers=api_env.headers("clinician"), json={"rtpcr_result": "negative"})
    assert other.status_code == 409 and other.headers["content-type"] == "application/problem+json"
    bad_sig = client.post(url, headers=api_env.headers("clinician"),
                          json={"rtpcr_result": "negative", "correction": {"password": "wrong-password", "reason":
                                                                           "lab re-test"}})
    assert bad_sig.status_code == 403
    fixed = client.post(url, headers=api_env.headers("clinician"),
                        json={"rtpcr_result": "negative", "confirmed_class": "normal",
                              "correction": {"password": api_env.password, "reason": "lab re-test was negative"}})
    assert fixed.status_code == 201, fixed.text
    assert fixed.json()["supersedes_id"] == first.json()["id"] and fixed.json()["signed_by"]
    assert client.get(f"/v1/predictions/{pid}", headers=api_env.headers("clinician")).json()["outcome"][
        "rtpcr_result"] == "negative"
    recorded = [e for e in list_events(action="outcome.recorded") if e["details"]["prediction_id"] == pid]
    assert len(recorded) == 2 and recorded[1]["details"]["correction"] is True
    assert "lab re-test" not in json.dumps(recorded)  # free-text reason only as a hash

    missing = client.get("/v1/predictions/00000000-0000-4000-8000-000000000000", headers=api_env.headers("clinician"))
    assert missing.status_code == 404 and missing.json()["status"] == 404


def test_model_health_metrics(client, api_env):  # noqa: F811
    m = client.get("/v1/model", headers=api_env.headers("clinician"))
    assert m.status_code == 200 and m.json()["version"] == api_env.version
    assert 0 < m.json()["operating_threshold"] < 1 and m.json()["card"]["intended_use"]
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["model_version"] == api_env.version
    met = client.get("/metrics", follow_redirects=False)
    assert met.status_code == 200
    assert "cxr_predictions_total" in met.text and "cxr_http_requests_total" in met.text
    assert "cxr_input_warnings_total" in met.text and 'kind="age-under-18"' in met.text
    assert "cxr_outcomes_total" in met.text
    v = client.get("/v1/audit/verify", headers=api_env.headers("compliance_officer"))
    assert v.status_code == 200 and v.json()["ok"] is True
    rep = client.get("/v1/audit/report", params={"from": "2020-01-01", "to": "2100-01-01", "format": "json"},
                     headers=api_env.headers("compliance_officer"))
    assert rep.status_code == 200, rep.text
    assert rep.headers["content-type"].startswith("application/json")
    report = rep.json()
    assert report["audit_chain"]["ok"] is True, report["audit_chain"]
    assert report["audit_chain"]["first_bad_seq"] is None
    assert report["predictions"]["available"] is True
    assert report["predictions"]["total"] >= 1, report["predictions"]
    assert report["predictions"]["total"] == sum(p["n"] for p in report["predictions"]["by_model_site"])
    assert api_env.version in {p["model_version"] for p in report["predictions"]["by_model_site"]}


def test_upload_parts_stay_in_memory_up_to_the_configured_size(api_env):  # noqa: F811
    """An image part up to ``upload_memory_bytes`` is parsed in memory (no thread-pool hop per 64 KiB
    chunk of a spooled file); never below Starlette's own 1 MiB."""
    from starlette.formparsers import MultiPartParser

    from app.main import create_app
    from core.config import Settings

    try:
        create_app(Settings(upload_memory_bytes=4 << 20))
        assert MultiPartParser.spool_max_size == 4 << 20
        create_app(Settings(upload_memory_bytes=10))
        assert MultiPartParser.spool_max_size == 1 << 20
    finally:
        create_app()
    assert MultiPartParser.spool_max_size == Settings().upload_memory_bytes == 16 << 20


def test_jpeg2000_upload_is_prepared_from_its_reduced_level(client, api_env):  # noqa: F811
    """The route hands the model-input size to the decoder: a JPEG 2000 upload — here without a VOI
    window, so min–max scaled — is prepared from its reduced wavelet level exactly as
    ``decode_and_prepare`` does it (the one preprocessing path), not from the full decode."""
    import numpy as np
    from dicom_factory import JPEG2000Lossless, pattern_pixels

    from core.config import get_settings
    from models.preprocessing import decode_and_prepare

    size = get_settings().cache_image_size
    rng = np.random.default_rng(7)
    stored = np.clip(pattern_pixels(4 * size, 4 * size, 12).astype(np.int64)
                     + rng.integers(-60, 60, (4 * size, 4 * size)), 0, 4095).astype(np.uint16)
    data = make_dicom(rows=4 * size, cols=4 * size, bits=12, pixels=stored, transfer_syntax=JPEG2000Lossless)
    r = client.post("/v1/predictions", headers=api_env.headers("clinician"),
                    files={"image": ("cxr.dcm", data, "application/dicom")},
                    data={"vitals": json.dumps(VITALS), "site": "site-a"})
    assert r.status_code == 200, r.text
    cached, _ = client.app.state.input_cache.get(r.json()["id"])  # float16 in the cache
    decoded, reduced = decode_and_prepare(data, size)
    _, full = decode_and_prepare(data, size, reduced=False)
    assert decoded.reduction == 2  # 4 x size -> size
    assert np.abs(cached.reshape(-1) - reduced.reshape(-1)).max() <= 1e-3
    assert np.abs(cached.reshape(-1) - full.reshape(-1)).max() > 1e-2  # the two paths are distinguishable
