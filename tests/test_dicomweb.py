"""DICOMweb STOW-RS and vitals-ahead-of-the-study, through the API on the session's real champion.

The same prediction service as ``POST /v1/predictions``: the stored row, the audit entry and the
warnings are those of the REST path; only the channel differs.
"""
from __future__ import annotations

import io
import json

import pydicom
import pytest
from api_fixtures import api_env, started_client  # noqa: F401
from dicom_factory import make_dicom

VITALS = {"temperature_c": 38.4, "spo2_percent": 91, "heart_rate_bpm": 104, "respiratory_rate": 24,
          "systolic_bp_mmhg": 118, "age_years": 57, "sex": "F"}


@pytest.fixture(scope="module")
def client(api_env):  # noqa: F811
    with started_client() as c:
        yield c


def _with_accession(data: bytes, accession: str, seed: int = 0) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.AccessionNumber = accession
    ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[accession, str(seed)])
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _multipart(parts: list[bytes], boundary: str = "cxr-boundary-42") -> tuple[bytes, str]:
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                    for p in parts) + b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def _stow(client, headers, parts):
    body, ctype = _multipart(parts)
    return client.post("/dicomweb/studies", content=body, headers={**headers, "Content-Type": ctype})


def _served_for(pid: str) -> list[dict]:
    from compliance.audit import list_events

    return [e for e in list_events(action="prediction.served") if e["details"]["prediction_id"] == pid]


def test_vitals_ahead_then_stow_uses_them_like_the_rest_path(client, api_env):  # noqa: F811
    from app.storage import get_prediction
    from compliance.audit import list_events

    clin = api_env.headers("clinician")
    r = client.put("/v1/vitals/ACC-STOW-1", headers=clin, json=VITALS)
    assert r.status_code == 200, r.text
    assert set(r.json()["fields"]) == set(VITALS) and r.json()["expires_at"].endswith("Z")
    stored = list_events(action="vitals.stored")[-1]
    assert "ACC-STOW-1" not in json.dumps(stored) and "38.4" not in json.dumps(stored)

    with_vitals = _with_accession(make_dicom(rows=128, cols=128), "ACC-STOW-1", seed=1)
    without = _with_accession(make_dicom(rows=128, cols=128), "ACC-NO-VITALS", seed=2)
    ct = _with_accession(make_dicom(modality="CT", rows=128, cols=128), "ACC-CT", seed=3)
    r = _stow(client, clin, [with_vitals, without, ct])
    assert r.status_code == 202, r.text  # two analysed, one refused
    assert r.headers["content-type"].startswith("application/dicom+json")
    body = r.json()
    referenced = body["00081199"]["Value"]
    failed = body["00081198"]["Value"]
    assert len(referenced) == 2 and len(failed) == 1
    assert failed[0]["00081197"]["Value"] == [0xC000]
    ct_uid = pydicom.dcmread(io.BytesIO(ct)).SOPInstanceUID
    assert failed[0]["00081155"]["Value"] == [ct_uid]

    served = [e for e in list_events(action="prediction.served") if e["details"].get("channel") == "stow"]
    assert len(served) >= 2
    rows = [get_prediction(e["details"]["prediction_id"]) for e in served[-2:]]
    by_vitals = {all(r["vitals_present"].values()): r for r in rows}
    # the study whose accession had vitals used them (no vitals-missing warning); the other did not
    assert True in by_vitals and False in by_vitals, [r["vitals_present"] for r in rows]
    assert "vitals-missing" not in {w["code"] for w in by_vitals[True]["warnings"]}
    assert "vitals-missing" in {w["code"] for w in by_vitals[False]["warnings"]}
    assert all(r["requested_by"] == api_env.users["clinician"] for r in rows)
    refused = list_events(action="dicom.instance.refused")
    assert refused and refused[-1]["details"]["refusal_code"] == "wrong-modality", refused[-1]


def test_same_pixels_same_probability_through_rest_and_stow(client, api_env):  # noqa: F811
    clin = api_env.headers("clinician")
    data = _with_accession(make_dicom(rows=128, cols=128, seed=5), "ACC-SAME", seed=5)
    client.put("/v1/vitals/ACC-SAME", headers=clin, json=VITALS)
    rest = client.post("/v1/predictions", headers=clin, files={"image": ("x.dcm", data, "application/dicom")},
                       data={"vitals": json.dumps(VITALS), "site": "site-a"})
    assert rest.status_code == 200, rest.text
    r = _stow(client, clin, [data])
    assert r.status_code == 200, r.text
    from app.storage import get_prediction
    from compliance.audit import list_events

    pid = [e for e in list_events(action="prediction.served") if e["details"].get("channel") == "stow"][-1][
        "details"]["prediction_id"]
    stow_row = get_prediction(pid)
    assert stow_row["p_covid19"] == pytest.approx(rest.json()["p_covid19"], abs=1e-6)
    assert stow_row["decision"] == rest.json()["decision"]


@pytest.mark.parametrize("ctype, status", [
    ("application/dicom", 415),
    ('multipart/related; type="application/dicom+json"; boundary=x', 415),
    ('multipart/related; type="application/dicom"', 400),
])
def test_stow_bad_requests_are_problems(client, api_env, ctype, status):  # noqa: F811
    r = client.post("/dicomweb/studies", content=b"--x\r\n\r\nabc\r\n--x--", headers={
        **api_env.headers("clinician"), "Content-Type": ctype})
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")


def test_stow_and_vitals_need_the_right_role(client, api_env):  # noqa: F811
    body, ctype = _multipart([make_dicom(rows=64, cols=64)])
    assert client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype}).status_code == 401
    r = client.post("/dicomweb/studies", content=body, headers={**api_env.headers("researcher"),
                                                                 "Content-Type": ctype})
    assert r.status_code == 403
    assert client.put("/v1/vitals/ACC-1", headers=api_env.headers("compliance_officer"), json=VITALS).status_code == 403


def test_out_of_range_vitals_are_refused_not_stored(client, api_env):  # noqa: F811
    from app.services.vitals import vitals_for_accession

    r = client.put("/v1/vitals/ACC-BAD", headers=api_env.headers("clinician"), json={"spo2_percent": 140})
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")
    assert vitals_for_accession("ACC-BAD") == {}


def test_vitals_expire(api_env, monkeypatch):  # noqa: F811
    from app.services.vitals import store_vitals, vitals_for_accession
    from core.config import get_settings

    monkeypatch.setattr(get_settings(), "vitals_ttl_hours", -1.0)  # already expired when stored
    store_vitals("ACC-OLD", {"spo2_percent": 95.0}, stored_by="x")
    assert vitals_for_accession("ACC-OLD") == {}
    monkeypatch.setattr(get_settings(), "vitals_ttl_hours", 1.0)
    store_vitals("ACC-NEW", {"spo2_percent": 95.0}, stored_by="x")
    assert vitals_for_accession("ACC-NEW") == {"spo2_percent": 95.0}
