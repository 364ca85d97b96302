"""Hostile inputs: each gets a 4xx application/problem+json with a human message, never a 5xx."""
from __future__ import annotations

import json

import numpy as np
import pytest
from api_fixtures import api_env, started_client  # noqa: F401
from dicom_factory import FAKE_PATIENT_NAME, make_dicom

GOOD_VITALS = json.dumps({"temperature_c": 37.1, "age_years": 44})


def _cases() -> dict[str, dict]:
    good = make_dicom(rows=96, cols=96)
    return {
        "truncated-dicom": {"image": good[: len(good) // 2]},
        "truncated-header": {"image": good[:200]},
        "garbage-bytes": {"image": np.random.default_rng(1).bytes(5000)},
        "empty-file": {"image": b""},
        "ct": {"image": make_dicom(modality="CT")},
        "mr": {"image": make_dicom(modality="MR")},
        "us": {"image": make_dicom(modality="US")},
        "ot": {"image": make_dicom(modality="OT")},
        "rgb": {"image": make_dicom(photometric="RGB", bits=8)},
        "multi-frame": {"image": make_dicom(frames=3)},
        "lateral": {"image": make_dicom(view="LL")},
        "not-chest": {"image": make_dicom(body_part="KNEE")},
        "no-pixel-data": {"image": make_dicom(pixel_data=False)},
        "bomb-30000x30000": {"image": make_dicom(rows=30000, cols=30000, fake_pixel_bytes=b"\0" * 4096)},
        "png-not-dicom": {"image": b"\x89PNG\r\n\x1a\n" + b"\0" * 100},
        "vitals-out-of-range": {"vitals": json.dumps({"temperature_c": 51})},
        "vitals-spo2-range": {"vitals": json.dumps({"spo2_percent": 130})},
        "vitals-not-number": {"vitals": json.dumps({"heart_rate_bpm": "fast"})},
        "vitals-unknown-field": {"vitals": json.dumps({"blood_type": "A"})},
        "vitals-bad-json": {"vitals": "{temperature_c: 37"},
        "vitals-json-array": {"vitals": "[1, 2]"},
        "vitals-deep-json": {"vitals": "[" * 5000 + "]" * 5000},
        "vitals-nan": {"vitals": '{"temperature_c": NaN}'},
        "bad-site": {"site": "../../etc/passwd"},
        "missing-image": {"image": None},
    }


_ABSENT = object()
_MALFORMED_VITALS = ("malformed-json", {"field": "vitals"})


def _refused(code: str) -> tuple[str, dict]:
    """An ``ImageRefused`` of the data layer: ``image-refused/<code>`` with ``refusal_code`` = code."""
    return f"image-refused/{code}", {"refusal_code": code}


# label -> (problem ``code``, further members the problem document must carry with exactly these values)
EXPECTED: dict[str, tuple[str, dict]] = {
    "truncated-dicom": _refused("truncated"),
    "truncated-header": _refused("truncated"),
    "garbage-bytes": _refused("not-dicom"),
    "empty-file": _refused("empty"),
    "ct": _refused("wrong-modality"),
    "mr": _refused("wrong-modality"),
    "us": _refused("wrong-modality"),
    "ot": _refused("wrong-modality"),
    "rgb": _refused("colour-image"),
    "multi-frame": _refused("multi-frame"),
    "lateral": _refused("lateral-view"),
    "not-chest": _refused("not-chest"),
    "no-pixel-data": _refused("no-pixel-data"),
    "bomb-30000x30000": _refused("too-many-pixels"),
    "png-not-dicom": _refused("not-dicom"),
    "vitals-out-of-range": ("invalid-vitals", {"field": "temperature_c", "valid_range": [30.0, 45.0], "value": 51}),
    "vitals-spo2-range": ("invalid-vitals", {"field": "spo2_percent", "valid_range": [50.0, 100.0], "value": 130}),
    "vitals-not-number": ("invalid-vitals", {"field": "heart_rate_bpm", "valid_range": [20.0, 250.0],
                                             "value": "fast"}),
    "vitals-unknown-field": ("invalid-vitals", {"field": "blood_type", "valid_range": _ABSENT}),
    "vitals-bad-json": _MALFORMED_VITALS,
    "vitals-json-array": _MALFORMED_VITALS,
    "vitals-deep-json": _MALFORMED_VITALS,
    "vitals-nan": _MALFORMED_VITALS,  # NaN is not JSON (RFC 8259), never read as a missing value
    "bad-site": ("validation-error", {}),
    "missing-image": ("validation-error", {}),
}
# request-validation failures: the location of the offending form field
VALIDATION_LOC = {"bad-site": ["body", "site"], "missing-image": ["body", "image"]}


def test_expected_covers_every_case():
    assert set(EXPECTED) == set(_cases())


@pytest.fixture(scope="module")
def client(api_env):  # noqa: F811
    from core.config import Settings

    with started_client(Settings(max_upload_bytes=300_000)) as c:
        yield c


def _assert_problem(r, label: str, expect: int | None = None) -> dict:
    assert 400 <= r.status_code < 500, f"{label}: {r.status_code} {r.text[:300]}"
    if expect:
        assert r.status_code == expect, f"{label}: {r.status_code} {r.text[:300]}"
    assert r.headers["content-type"] == "application/problem+json", label
    body = r.json()
    assert body["status"] == r.status_code and body["title"] and body["detail"] and body["type"], label
    return body


@pytest.mark.parametrize("label", sorted(_cases()))
def test_hostile_prediction_input(client, api_env, label):  # noqa: F811
    case = _cases()[label]
    image = case.get("image", make_dicom(rows=96, cols=96))
    files = {"image": ("x.dcm", image, "application/dicom")} if image is not None else None
    data = {"vitals": case.get("vitals", GOOD_VITALS)}
    if "site" in case:
        data["site"] = case["site"]
    if files is None:
        data["dummy"] = "x"
    r = client.post("/v1/predictions", headers=api_env.headers("clinician"), files=files, data=data)
    body = _assert_problem(r, label, 422)
    code, extra = EXPECTED[label]
    assert body["code"] == code, (label, body)
    assert body["type"].endswith("/" + code), (label, body)
    for key, value in extra.items():
        if value is _ABSENT:
            assert key not in body, (label, key, body)
        else:
            assert body.get(key) == value, (label, key, body)
    if label in VALIDATION_LOC:
        assert [e["loc"] for e in body["errors"]] == [VALIDATION_LOC[label]], body
    assert FAKE_PATIENT_NAME not in r.text


def test_oversized_upload(client, api_env):  # noqa: F811
    big = make_dicom(rows=512, cols=512, bits=16)  # ~512 KiB > the 300 kB limit of this app
    r = client.post("/v1/predictions", headers=api_env.headers("clinician"),
                    files={"image": ("big.dcm", big, "application/dicom")}, data={"vitals": GOOD_VITALS})
    assert _assert_problem(r, "oversized", 413)["code"] == "upload-too-large"

    def chunks():  # no Content-Length: the limit applies while streaming
        for _ in range(40):
            yield b"x" * 10_000

    r = client.post("/v1/predictions", headers=api_env.headers("clinician", **{
        "Content-Type": "multipart/form-data; boundary=abc"}), content=chunks())
    _assert_problem(r, "oversized-chunked", 413)


def test_other_bad_requests(client, api_env):  # noqa: F811
    h = api_env.headers("clinician")
    _assert_problem(client.post("/v1/predictions", headers=h, json={"image": "x"}), "json-instead-of-multipart")
    _assert_problem(client.post("/v1/predictions", headers={**h, "Content-Type": "multipart/form-data"},
                                content=b"--zz\r\nbroken"), "broken-multipart")
    pid = "00000000-0000-4000-8000-000000000000"
    _assert_problem(client.post(f"/v1/predictions/{pid}/outcome", headers={**h, "Content-Type": "application/json"},
                                content=b'{"rtpcr_result": '), "bad-json-outcome", 422)
    _assert_problem(client.post(f"/v1/predictions/{pid}/outcome", headers=h, json={"rtpcr_result": "maybe"}),
                    "bad-outcome-value", 422)
    _assert_problem(client.post(f"/v1/predictions/{pid}/outcome", headers=h, json={}), "empty-outcome", 422)
    _assert_problem(client.post(f"/v1/predictions/{pid}/outcome", headers=h, json={"rtpcr_result": "positive"}),
                    "outcome-unknown-prediction", 404)
    _assert_problem(client.get("/v1/predictions/not-a-uuid", headers=h), "bad-id", 422)
    _assert_problem(client.get("/v1/nowhere", headers=h), "unknown-route", 404)
    _assert_problem(client.put("/v1/model", headers=h), "wrong-method", 405)
    co = api_env.headers("compliance_officer")
    _assert_problem(client.get("/v1/audit/report", params={"from": "yesterday", "to": "2100-01-01"}, headers=co),
                    "bad-date", 422)
    _assert_problem(client.get("/v1/audit/report", params={"from": "2020-01-01", "to": "2100-01-01",
                                                           "format": "docx"}, headers=co), "bad-format", 422)
