"""``cxr data check`` and ``cxr data synth`` through the real Typer app (and once through the console entry)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from dicom_factory import FAKE_PATIENT_NAME, JPEG2000Lossless, make_dicom
from typer.testing import CliRunner

from app.cli import data as data_cli

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    root = typer.Typer(pretty_exceptions_enable=False)

    @root.callback()
    def _cb() -> None:
        """test root"""

    data_cli.register(root)
    return root


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    out = {
        "good": make_dicom(rows=64, cols=64),
        "good_j2k": make_dicom(rows=64, cols=48, modality="DX", view="AP", transfer_syntax=JPEG2000Lossless),
        "lateral": make_dicom(view="LL"),
        "ct": make_dicom(modality="CT"),
    }
    paths = {}
    for name, data in out.items():
        paths[name] = tmp_path / f"{name}.dcm"
        paths[name].write_bytes(data)
    paths["text"] = tmp_path / "notes.txt"
    paths["text"].write_text("not an image")
    return paths


def _run(app, args):
    result = CliRunner().invoke(app, args)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def test_all_accepted_exit_0_json(app, files):
    r = _run(app, ["data", "check", str(files["good"]), str(files["good_j2k"]), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["n_files"] == 2 and doc["n_accepted"] == 2 and doc["n_refused"] == 0
    a, b = doc["files"]
    assert a["accepted"] and a["modality"] == "CR" and a["view"] == "PA" and a["photometric"] == "MONOCHROME2"
    assert a["transfer_syntax"] == "Explicit VR Little Endian" and a["shape"] == [64, 64]
    assert b["modality"] == "DX" and b["view"] == "AP" and b["shape"] == [64, 48]
    assert b["transfer_syntax"] == "JPEG 2000 Image Compression (Lossless Only)"


def test_refusals_exit_1_with_reasons(app, files, tmp_path):
    args = [str(files[k]) for k in ("good", "lateral", "ct", "text")] + [str(tmp_path / "missing.dcm"), str(tmp_path)]
    r = _run(app, ["data", "check", *args, "--json"])
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    codes = [f["code"] for f in doc["files"]]
    assert codes == [None, "lateral-view", "wrong-modality", "not-dicom", "not-found", "not-a-file"]
    assert all(f["reason"] for f in doc["files"][1:])
    assert FAKE_PATIENT_NAME not in r.output


def test_human_table(app, files):
    r = _run(app, ["data", "check", str(files["good"]), str(files["lateral"])])
    assert r.exit_code == 1
    assert "accepted" in r.stdout and "refused" in r.stdout and "lateral-view" in r.stdout
    assert "1 of 2 accepted" in r.stdout


def test_recursive_folder(app, tmp_path):
    d = tmp_path / "dicoms"
    (d / "sub").mkdir(parents=True)
    (d / "a.dcm").write_bytes(make_dicom())
    (d / "sub" / "b.dcm").write_bytes(make_dicom(modality="DX"))
    r = _run(app, ["data", "check", "-r", str(d), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["n_accepted"] == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_permission_denied(app, files):
    files["good"].chmod(0)
    r = _run(app, ["data", "check", str(files["good"]), "--json"])
    assert r.exit_code == 1 and json.loads(r.stdout)["files"][0]["code"] == "unreadable"


def test_max_pixels_option(app, files):
    r = _run(app, ["data", "check", str(files["good"]), "--max-pixels", "100", "--json"])
    assert r.exit_code == 1 and json.loads(r.stdout)["files"][0]["code"] == "too-many-pixels"


def test_no_files_is_a_usage_error(app):
    r = CliRunner().invoke(app, ["data", "check"])
    assert r.exit_code == 2


def test_synth_then_check(app, tmp_path):
    out = tmp_path / "cohort"
    r = _run(app, ["data", "synth", "--patients", "4", "--out", str(out), "--seed", "5", "--image-size", "64"])
    assert r.exit_code == 0, r.output
    with open(out / "vitals.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) >= 4
    r = _run(app, ["data", "check", *[str(out / row["filename"]) for row in rows], "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["n_accepted"] == len(rows)
    bad = CliRunner().invoke(app, ["data", "synth", "--patients", "2", "--out", str(tmp_path / "x"), "--variant", "nope"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def test_console_entry_point(files):
    """The real ``cxr`` entry (app.cli) wires the data group: one subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "data", "check", "--json", str(files["good"]), str(files["ct"])],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 1, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert [f["accepted"] for f in doc["files"]] == [True, False]
