"""Fast checks of the DICOM integration's parts (no PACS): spool durability rules, destination
parsing, the STOW-RS response, the result objects (built from a real CR header, validated by
dicom3tools when installed) and ``handle_instances`` behind the real input gate.

``gate_analyse`` below is the real input gate (``models.preprocessing.decode_dicom`` +
``prepare_image``) plus a real seeded torch model (a 1-layer conv net, not trained): the
round-trip tests with the trained champion are in tests/test_dicom_pacs.py.
"""
from __future__ import annotations

import io
import subprocess

import numpy as np
import pydicom
import pytest
from dicom_factory import make_dicom
from pacs_fixtures import which


def gate_analyse(data: bytes, accession: str | None):
    import torch

    from app.dicom.types import AnalysisResult, Refusal
    from models.preprocessing import ImageRefused, decode_dicom, prepare_image

    try:
        decoded = decode_dicom(data)
    except ImageRefused as exc:
        return Refusal(exc.code, exc.reason)
    image = prepare_image(decoded.pixels, 64)[0]
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 5, padding=2)
    with torch.no_grad():
        act = torch.sigmoid(net(torch.from_numpy(image)[None, None]))[0, 0].numpy()
    p = float(act.mean())
    return AnalysisResult(prediction_id="00000000-0000-4000-8000-000000000001", p_covid19=p,
                          probabilities={"covid19": p, "other_pneumonia": (1 - p) / 2, "normal": (1 - p) / 2},
                          decision="covid19-positive" if p >= 0.5 else "covid19-negative", operating_threshold=0.5,
                          model_name="seeded-conv", model_version="0", image=image,
                          heatmap=(act - act.min()) / (np.ptp(act) + 1e-6), warnings=[], approval=None)


# ------------------------------------------------------------------ spool
def test_spool_files_are_private_durable_and_recovered(tmp_path):
    from app.dicom.spool import Spool

    spool = Spool(tmp_path / "spool")
    assert (spool.root.stat().st_mode & 0o777) == 0o700
    a = spool.put(b"first")
    b = spool.put(b"second")
    assert (a.stat().st_mode & 0o777) == 0o600 and a.read_bytes() == b"first"
    assert spool.pending() == [a, b] and spool.depth() == 2
    (spool.root / ".half-written.dcm.tmp").write_bytes(b"x")  # a crash mid-write: never acknowledged
    again = Spool(tmp_path / "spool")
    assert again.recover() == [a, b]
    assert not list(again.root.glob(".*.tmp"))
    again.quarantine(a)
    assert again.pending() == [b] and again.quarantined() == 1
    again.remove(b)
    assert again.depth() == 0 and again.oldest_age_seconds() == 0.0


def test_spool_write_failure_is_not_acknowledged(tmp_path):
    """The C-STORE handler answers 0xA700 (out of resources) when the spool cannot write (disk full)."""
    import errno

    from app.dicom.listener import DicomListener

    lst = DicomListener(analyse=gate_analyse, spool_dir=tmp_path / "spool", destination=None)

    class Event:
        assoc = object()

        def encoded_dataset(self, include_meta=True):
            return b"DICM"

    def disk_full(data):
        raise OSError(errno.ENOSPC, "No space left on device")

    assert lst._on_store(Event()) == 0x0000 and lst.spool.depth() == 1
    lst.spool.put = disk_full
    assert lst._on_store(Event()) == 0xA700
    assert lst.spool.depth() == 1


# ------------------------------------------------------------------ destination
@pytest.mark.parametrize("text, expected", [
    ("PACS@10.0.0.5:104", ("PACS", "10.0.0.5", 104)),
    ("ORTHANC@orthanc:4242", ("ORTHANC", "orthanc", 4242)),
    ("MY AE@[::1]:11112", ("MY AE", "::1", 11112)),
])
def test_destination_parse(text, expected):
    from app.dicom.sender import Destination

    d = Destination.parse(text)
    assert (d.ae_title, d.host, d.port) == expected


@pytest.mark.parametrize("text", ["PACS", "PACS@host", "@host:104", "PACS@host:0", "PACS@host:70000",
                                  "AETITLEWAYTOOLONG17@h:104", "PACS@ho st:104"])
def test_destination_parse_refuses_with_the_expected_form(text):
    from app.dicom.sender import Destination

    with pytest.raises(ValueError, match="AE_TITLE@HOST:PORT"):
        Destination.parse(text)


# ------------------------------------------------------------------ handle_instances + STOW response
def test_handle_instances_results_refusals_and_stow_response(cxr_env):
    from app.dicom.pipeline import handle_instances, stow_response, stow_status
    from compliance.audit import list_events

    cr = make_dicom("CR", rows=128, cols=128)
    ct = make_dicom("CT", rows=128, cols=128)
    truncated = cr[: len(cr) // 2]
    outcomes = handle_instances([cr, pydicom.dcmread(io.BytesIO(ct)), truncated], gate_analyse)
    assert [o.status for o in outcomes] == ["results", "refused", "refused"]
    assert outcomes[1].refusal.code == "wrong-modality"
    assert outcomes[2].refusal.code in ("truncated", "not-dicom")
    assert outcomes[0].objects.sr.StudyInstanceUID == pydicom.dcmread(io.BytesIO(cr)).StudyInstanceUID
    refused = list_events(action="dicom.instance.refused")
    assert [e["details"]["refusal_code"] for e in refused] == ["wrong-modality", outcomes[2].refusal.code]
    assert all(len(e["details"]["instance_hash"] or "0" * 64) == 64 for e in refused)

    body = stow_response(outcomes, retrieve_url="https://pacs.example/studies/1")
    ok = body["00081199"]["Value"]
    failed = body["00081198"]["Value"]
    assert len(ok) == 1 and ok[0]["00081155"]["Value"] == [outcomes[0].sop_instance_uid]
    assert len(failed) == 2 and all(f["00081197"] == {"vr": "US", "Value": [0xC000]} for f in failed)
    assert failed[0]["00081150"]["Value"] == ["1.2.840.10008.5.1.4.1.1.2"]
    assert stow_status(outcomes) == 202 and stow_status(outcomes[:1]) == 200 and stow_status(outcomes[1:]) == 409
    # the body is valid DICOM JSON
    ds = pydicom.Dataset.from_json(body)
    assert len(ds.ReferencedSOPSequence) == 1 and len(ds.FailedSOPSequence) == 2


def test_analysis_error_is_recorded_not_raised(cxr_env):
    from app.dicom.pipeline import process_instance
    from compliance.audit import list_events

    def broken(data, accession):
        raise RuntimeError("model server down: " + str(accession))

    out = process_instance(make_dicom("CR"), broken, actor="test")
    assert out.status == "error" and out.error == "RuntimeError"
    events = list_events(action="dicom.instance.failed")
    assert events and "ACC" not in str(events[-1]["details"])  # the exception text (with the accession) is not kept


# ------------------------------------------------------------------ result objects
def test_result_objects_are_valid_and_carry_the_source_study(cxr_env, tmp_path):
    import highdicom as hd

    from app.dicom.results import build_results, encode, result_uids
    from app.dicom.types import Approval

    data = make_dicom("DX", rows=128, cols=128, sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1.1")
    src = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    res = gate_analyse(data, None)
    res.approval = Approval("alice", "2026-01-01T00:00:00Z")
    res.warnings = [{"code": "view-missing", "message": "ViewPosition missing"}]
    objs = build_results(src, res)
    for ds in objs.datasets():
        assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == src.PatientID
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    again = build_results(src, res)  # deterministic UIDs: a resend replaces, never duplicates
    assert again.sr.SOPInstanceUID == objs.sr.SOPInstanceUID and again.sc.SOPInstanceUID == objs.sc.SOPInstanceUID
    assert result_uids(src, res)["sr"] == objs.sr.SOPInstanceUID
    assert objs.sc.BurnedInAnnotation == "YES" and objs.sc.pixel_array.shape == (512 + 84, 512, 3)
    parsed = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(encode(objs.sr))))
    assert parsed.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    if which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) not installed")
    for name, ds in (("sr", objs.sr), ("sc", objs.sc)):
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(encode(ds))
        v = subprocess.run([which("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
        assert not [ln for ln in (v.stdout + v.stderr).splitlines() if ln.startswith("Error")], v.stderr
