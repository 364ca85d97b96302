"""Hospital DICOM integration against the real thing (issue 16).

Real parts only: Orthanc (Debian package) as the hospital PACS on loopback with a generated JSON
configuration; dcmtk ``storescu``/``echoscu`` as the modality; ``cxr dicom listen`` (pynetdicom)
in a subprocess, analysing with the default ``--analyse`` factory, i.e. a REAL trained model: the
session's tiny champion from ``api_fixtures`` (synthetic cohort, 1 epoch, registered in MLflow and
approved with an e-signature), behind the real input gate ``models.preprocessing.decode_dicom``.
Results are checked in Orthanc through its REST API, read with ``dsrdump``, validated with
dicom3tools' ``dciodvfy`` and parsed back with highdicom.

Skips only when the tools are missing *and* cannot be installed (``make test`` installs them via
``make system-deps``).
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from api_fixtures import api_env  # noqa: F401
from dicom_factory import FAKE_PATIENT_ID, FAKE_PATIENT_NAME
from pacs_fixtures import Orthanc, chest_file, echoscu, ensure_tools, free_port, storescu, which
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

REPO = Path(__file__).resolve().parent.parent
LISTENER_AET = "CXR-AI"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
PHI = [FAKE_PATIENT_NAME.split("^")[0], FAKE_PATIENT_ID, "ACC20200101", "19610203", "REFERRER"]

_missing = ensure_tools()
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"not installed and not installable here: {_missing}")


class Listener:
    """``cxr dicom listen`` in a subprocess (the real CLI, the real champion)."""

    def __init__(self, env, workdir: Path, destination: str, port: int | None = None) -> None:
        self.env, self.workdir, self.destination = env, Path(workdir), destination
        self.port = port or free_port()
        self.metrics_port = free_port()
        self.spool = self.workdir / "spool"
        self.log = self.workdir / "listener.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 150.0) -> "Listener":
        self.workdir.mkdir(parents=True, exist_ok=True)
        fh = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "dicom", "listen", "--host", "127.0.0.1", "--port", str(self.port),
             "--ae-title", LISTENER_AET, "--send-to", self.destination, "--spool", str(self.spool),
             "--metrics-port", str(self.metrics_port), "--requeue-delay", "1"],
            cwd=str(REPO), env=self.env.env(), stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"listener exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            if echoscu("127.0.0.1", self.port, LISTENER_AET).returncode == 0:
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"listener not answering C-ECHO in {timeout} s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def send(self, files, *, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        return storescu("127.0.0.1", self.port, LISTENER_AET, list(files), extra=extra)

    def metrics(self) -> str:
        import httpx

        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text

    def spooled(self) -> list[Path]:
        return sorted(self.spool.glob("*.dcm"))


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    orthanc = Orthanc(tmp_path_factory.mktemp("orthanc"),
                      modalities={"cxr": [LISTENER_AET, "127.0.0.1", 11112]}).start()
    yield orthanc
    orthanc.stop()


@pytest.fixture(scope="module")
def listener(api_env, pacs, tmp_path_factory):  # noqa: F811
    lst = Listener(api_env, tmp_path_factory.mktemp("listener"), pacs.destination).start()
    yield lst
    lst.stop()


def _results(instances: list[dict]) -> tuple[list[dict], list[dict]]:
    sr = [i for i in instances if i.get("SOPClassUID") == COMPREHENSIVE_3D_SR]
    sc = [i for i in instances if i.get("SOPClassUID") == SECONDARY_CAPTURE]
    return sr, sc


def _has_results(n: int):
    return lambda inst: all(len(x) >= n for x in _results(inst))


def _events(action: str) -> list[dict]:
    from compliance.audit import list_events

    return list_events(action=action)


def _wait_events(action: str, predicate, timeout: float = 60.0) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        ev = _events(action)
        if predicate(ev):
            return ev
        time.sleep(0.25)
    return _events(action)


def _keyed(uid: str) -> str:
    from app.dicom.pipeline import keyed_hash

    return keyed_hash(uid)


# ---------------------------------------------------------------------------------------------
def test_c_echo(listener):
    res = echoscu("127.0.0.1", listener.port, LISTENER_AET)
    assert res.returncode == 0, res.stdout + res.stderr


def test_cr_round_trip_sr_and_secondary_capture_in_the_source_study(listener, pacs, tmp_path):
    study = generate_uid()
    src = chest_file(tmp_path / "cr.dcm", study_uid=study, index=1)
    # the PACS holds the source study, as in a hospital
    assert storescu("127.0.0.1", pacs.dicom_port, pacs.AET, [src["path"]]).returncode == 0
    res = listener.send([src["path"]])
    assert res.returncode == 0, res.stdout + res.stderr

    instances = pacs.wait_for(study, _has_results(1), timeout=90)
    sr, sc = _results(instances)
    assert len(sr) == 1 and len(sc) == 1, [i.get("SOPClassUID") for i in instances]
    source = [i for i in instances if i.get("SOPInstanceUID") == src["sop_instance_uid"]]
    assert len(source) == 1
    sr, sc, source = sr[0], sc[0], source[0]
    # in the source study, with its identifiers, each in a new series
    for obj in (sr, sc):
        assert obj["StudyInstanceUID"] == study
        assert obj["PatientID"] == FAKE_PATIENT_ID and obj["AccessionNumber"] == "ACC20200101"
        assert obj["SeriesInstanceUID"] != source["SeriesInstanceUID"]
    assert sr["Modality"] == "SR" and sc["Modality"] == "OT"
    assert sr["SeriesInstanceUID"] != sc["SeriesInstanceUID"]
    assert sc["BurnedInAnnotation"] == "YES"
    assert "NOT FOR DIAGNOSTIC USE" in sc.get("ImageComments", "")

    sr_bytes, sc_bytes = pacs.file(sr["id"]), pacs.file(sc["id"])
    (tmp_path / "sr.dcm").write_bytes(sr_bytes)
    (tmp_path / "sc.dcm").write_bytes(sc_bytes)

    # dcmtk reads the SR
    dump = subprocess.run([which("dsrdump"), str(tmp_path / "sr.dcm")], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    text = dump.stdout
    for needle in ("Comprehensive 3D SR", "Imaging Measurement Report", "Device Observer Name", "Probability",
                   "Threshold Value", "COVID-19 decision at operating threshold", "Source of Measurement",
                   "RESEARCH SOFTWARE", "Algorithm Version"):
        assert needle in text, (needle, text)

    # dicom3tools validates both objects against their IODs: no errors
    for name in ("sr.dcm", "sc.dcm"):
        v = subprocess.run([which("dciodvfy"), str(tmp_path / name)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (v.stdout + v.stderr).splitlines() if line.startswith("Error")]
        assert not errors, (name, errors)

    # highdicom parses the report back; the numbers are the stored prediction's
    import highdicom as hd

    report = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(sr_bytes)))
    sent = _wait_events("dicom.results.sent", lambda ev: any(e["details"]["instance_hash"] == _keyed(
        src["sop_instance_uid"]) for e in ev))
    event = next(e for e in sent if e["details"]["instance_hash"] == _keyed(src["sop_instance_uid"]))
    from app import storage

    pred = storage.get_prediction(event["details"]["prediction_id"])
    assert pred is not None
    nums = {item.ConceptNameCodeSequence[0].CodeMeaning: float(item.MeasuredValueSequence[0].NumericValue)
            for item in _walk(report.ContentSequence) if item.ValueType == "NUM"}
    assert nums["Probability"] == pytest.approx(pred["p_covid19"], abs=1e-5)
    assert nums["Threshold Value"] == pytest.approx(pred["operating_threshold"], abs=1e-5)
    codes = [item for item in _walk(report.ContentSequence) if item.ValueType == "CODE"
             and item.ConceptNameCodeSequence[0].CodeMeaning == "COVID-19 decision at operating threshold"]
    expected = "Positive" if pred["decision"].endswith("positive") else "Negative"
    assert codes[0].ConceptCodeSequence[0].CodeMeaning == expected
    texts = [str(item.TextValue) for item in _walk(report.ContentSequence) if item.ValueType == "TEXT"]
    assert any(t.startswith("warning vitals-missing") for t in texts)
    assert any(f"approved by {api_env_approver()}" in t for t in texts), texts
    images = [item for item in _walk(report.ContentSequence) if item.ValueType == "IMAGE"]
    assert images[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src["sop_instance_uid"]
    sc_ds = pydicom.dcmread(io.BytesIO(sc_bytes))
    assert sc_ds.PhotometricInterpretation == "RGB" and sc_ds.pixel_array.shape[-1] == 3
    assert sc_ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src["sop_instance_uid"]

    # nothing identifying at rest here: audit trail and log hold no patient data; spool drained
    assert not listener.spooled()
    audit_text = json.dumps(_events(None))
    log_text = listener.log.read_text()
    for needle in PHI + [study, src["sop_instance_uid"]]:
        assert needle not in audit_text, needle
        assert needle not in log_text, needle
    assert pred["accession_hash"] and pred["accession_hash"] != "ACC20200101"


def api_env_approver() -> str:
    from api_fixtures import USERS

    return USERS["approver"]


def _walk(seq):
    for item in seq:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)


@pytest.mark.parametrize("sop_class, transfer_syntax, flag", [
    (DX_PRESENTATION, JPEG2000Lossless, "-xv"),
    (DX_PROCESSING, RLELossless, "-xr"),
    (None, JPEGLSLossless, "-xt"),
    (None, JPEGLosslessSV1, "-xs"),
    (DX_PRESENTATION, JPEG2000, "-xw"),
    (None, ExplicitVRBigEndian, "-xb"),
    (DX_PROCESSING, ImplicitVRLittleEndian, "-xi"),
    (None, DeflatedExplicitVRLittleEndian, "-xd"),
], ids=["dx-pres-j2k-lossless", "dx-proc-rle", "cr-jpegls", "cr-jpeg-lossless", "dx-pres-j2k-lossy",
        "cr-big-endian", "dx-proc-implicit", "cr-deflated"])
def test_cr_dx_in_every_transfer_syntax_produce_results(listener, pacs, tmp_path, sop_class, transfer_syntax, flag):
    study = generate_uid()
    modality = "DX" if sop_class else "CR"
    src = chest_file(tmp_path / "in.dcm", study_uid=study, modality=modality, sop_class_uid=sop_class,
                     transfer_syntax=transfer_syntax, index=3)
    assert str(pydicom.dcmread(src["path"], stop_before_pixels=True).file_meta.TransferSyntaxUID) == transfer_syntax
    res = listener.send([src["path"]], extra=(flag,))
    assert res.returncode == 0, res.stdout + res.stderr
    sr, sc = _results(pacs.wait_for(study, _has_results(1), timeout=60))
    assert len(sr) == 1 and len(sc) == 1


def test_ct_ultrasound_and_lateral_are_refused_audited_and_produce_nothing(listener, pacs, tmp_path):
    study = generate_uid()
    files = {
        "wrong-modality-ct": chest_file(tmp_path / "ct.dcm", study_uid=study, modality="CT", index=4),
        "wrong-modality-us": chest_file(tmp_path / "us.dcm", study_uid=study, modality="US", index=5, bits=8),
        "lateral-view": chest_file(tmp_path / "lat.dcm", study_uid=study, view="LL", index=6),
    }
    for f in files.values():  # each in its own association, as separate modalities would send them
        res = listener.send([f["path"]])
        assert res.returncode == 0, res.stdout + res.stderr
    wanted = {_keyed(f["sop_instance_uid"]): key.rsplit("-", 1)[0] if key.startswith("wrong") else key
              for key, f in files.items()}
    events = _wait_events("dicom.instance.refused",
                          lambda ev: wanted.keys() <= {e["details"]["instance_hash"] for e in ev})
    got = {e["details"]["instance_hash"]: e["details"]["refusal_code"] for e in events
           if e["details"]["instance_hash"] in wanted}
    assert got == wanted
    assert {e["details"]["sop_class"] for e in events if e["details"]["instance_hash"] in wanted} >= {
        "CT Image Storage", "Ultrasound Image Storage"}
    time.sleep(1.0)
    assert pacs.find_instances(StudyInstanceUID=study) == []  # no result objects at all
    log_text = listener.log.read_text()
    assert "code=wrong-modality" in log_text and "code=lateral-view" in log_text
    assert not listener.spooled()
    metrics = listener.metrics()
    assert 'cxr_dicom_refusals_total{code="wrong-modality"}' in metrics
    for needle in PHI:
        assert needle not in log_text and needle not in metrics


def test_50_instances_over_4_parallel_associations_all_produce_results(listener, pacs, tmp_path):
    studies = [generate_uid() for _ in range(4)]
    batches = [[chest_file(tmp_path / f"s{s}_{i}.dcm", study_uid=studies[s], index=10 + 13 * s + i)["path"]
                for i in range(13 if s < 2 else 12)] for s in range(4)]
    assert sum(map(len, batches)) == 50
    results: list[subprocess.CompletedProcess] = []
    threads = [threading.Thread(target=lambda b=b: results.append(listener.send(b))) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.returncode == 0 for r in results), [r.stderr[-500:] for r in results]
    for study, batch in zip(studies, batches):
        sr, sc = _results(pacs.wait_for(study, _has_results(len(batch)), timeout=150))
        assert len(sr) == len(batch) and len(sc) == len(batch), (len(sr), len(sc), len(batch))
    assert not listener.spooled()


def test_sigkill_mid_stream_loses_no_received_instance(listener, pacs, tmp_path):
    """SIGKILL while a modality is still sending; the restarted listener processes the spool."""
    study = generate_uid()
    files = [chest_file(tmp_path / f"k{i}.dcm", study_uid=study, index=100 + i)["path"] for i in range(40)]
    proc = subprocess.Popen([which("storescu"), "-v", "-aet", "MODALITY", "-aec", LISTENER_AET, "127.0.0.1",
                             str(listener.port), *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 60
    while len(listener.spooled()) < 8 and time.time() < deadline:
        time.sleep(0.01)
    listener.kill()
    out, _ = proc.communicate(timeout=60)
    acknowledged = out.count("Received Store Response (Success)")
    spooled = listener.spooled()
    assert 8 <= len(spooled) < 40, (len(spooled), out[-1000:])  # killed mid-stream, not after
    assert acknowledged <= len(spooled)  # every Success the modality got is on disk
    spooled_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in spooled}
    for p in spooled:
        assert (p.stat().st_mode & 0o777) == 0o600
    assert (listener.spool.stat().st_mode & 0o777) == 0o700

    listener.start()  # same spool: processed at start
    sr, sc = _results(pacs.wait_for(study, _has_results(len(spooled_uids)), timeout=120))
    referenced = set()
    for obj in sr:
        ds = pydicom.dcmread(io.BytesIO(pacs.file(obj["id"])))
        referenced |= {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in _walk(ds.ContentSequence)
                       if i.ValueType == "IMAGE"}
    assert spooled_uids <= referenced
    assert len(sr) == len(referenced) and len(sc) == len(sr)  # one SR + one SC per instance, no duplicates
    assert not listener.spooled()
    # the modality resends what was not acknowledged: it gets results, once
    rest = listener.send(files)
    assert rest.returncode == 0, rest.stdout[-2000:]
    sr, sc = _results(pacs.wait_for(study, _has_results(40), timeout=120))
    assert len(sr) == 40 and len(sc) == 40


def test_send_failure_retries_keeps_the_instance_and_is_visible(api_env, pacs, tmp_path):  # noqa: F811
    """PACS unreachable: the batch is retried with backoff, stays spooled, metrics count it; then delivered."""
    from prometheus_client import generate_latest

    from app.dicom.analysis import make_analyse
    from app.dicom.listener import DicomListener
    from app.dicom.sender import Destination
    from app.metrics import REGISTRY

    dead = Destination(pacs.AET, "127.0.0.1", free_port())
    lst = DicomListener(analyse=make_analyse(), spool_dir=tmp_path / "spool", destination=dead, port=0,
                        ae_title="CXR-AI-2", send_attempts=2, send_backoff=0.05, requeue_delay=0.5).start()
    try:
        study = generate_uid()
        src = chest_file(tmp_path / "cr.dcm", study_uid=study, index=7)
        failures_before = _sample("cxr_dicom_send_failures_total")
        assert storescu("127.0.0.1", lst.port, "CXR-AI-2", [src["path"]]).returncode == 0
        deadline = time.time() + 30
        while _sample("cxr_dicom_send_failures_total") <= failures_before and time.time() < deadline:
            time.sleep(0.1)
        assert _sample("cxr_dicom_send_failures_total") > failures_before
        assert _sample("cxr_dicom_send_retries_total") >= 1
        text = generate_latest(REGISTRY).decode()
        assert "cxr_dicom_spool_depth 1.0" in text
        assert len(list((tmp_path / "spool").glob("*.dcm"))) == 1
        # the PACS comes back: the requeued batch is delivered, the spool drains
        lst.sender.destination = Destination(pacs.AET, "127.0.0.1", pacs.dicom_port)
        sr, sc = _results(pacs.wait_for(study, _has_results(1), timeout=60))
        assert len(sr) == 1 and len(sc) == 1
        assert lst.wait_idle(10) and not list((tmp_path / "spool").glob("*.dcm"))
        assert "cxr_dicom_spool_depth 0.0" in generate_latest(REGISTRY).decode()
    finally:
        lst.stop()
    # the listener's champion holder stopped with it: no poller left verifying (and auditing) in the background
    assert lst.analyse.service._thread is None


def _sample(name: str) -> float:
    from app.metrics import REGISTRY

    return REGISTRY.get_sample_value(name) or 0.0
