"""Synthetic cohort: determinism, real decodable DICOM in mixed encodings, fake PHI in headers,
a class signal in the images and vitals, and a variant that shifts both."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.preprocessing import decode_dicom, parse_vitals, prepare_image
from pipelines.synth import CSV_COLUMNS, synthesize_cohort

N = 30
SIZE = 128


def _rows(d: Path) -> list[dict]:
    with open(d / "vitals.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    base = tmp_path_factory.mktemp("base")
    again = tmp_path_factory.mktemp("again")
    omicron = tmp_path_factory.mktemp("omicron")
    synthesize_cohort(N, base, seed=11, image_size=SIZE)
    synthesize_cohort(N, again, seed=11, image_size=SIZE)
    synthesize_cohort(N, omicron, seed=11, image_size=SIZE, variant="omicron")
    return base, again, omicron


def _zones(d: Path) -> dict[str, list[tuple[float, float, float]]]:
    """Per label: (lower-zone peripheral mean, upper/perihilar mean, left-right lung asymmetry) on 128² arrays."""
    out: dict[str, list] = {}
    for r in _rows(d):
        x = prepare_image(decode_dicom(d / r["filename"]).pixels, SIZE)[0]
        lower = (x[72:92, 22:40].mean() + x[72:92, 88:106].mean()) / 2
        upper = (x[30:55, 40:55].mean() + x[30:55, 73:88].mean()) / 2
        asym = abs(x[30:92, 22:55].mean() - x[30:92, 73:106].mean())
        out.setdefault(r["label"], []).append((lower, upper, asym))
    return out


def test_deterministic_for_a_seed(cohorts, tmp_path):
    base, again, _ = cohorts
    files = sorted(p.name for p in base.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    for name in files:
        assert (base / name).read_bytes() == (again / name).read_bytes(), name
    other = tmp_path / "other"
    synthesize_cohort(3, other, seed=12, image_size=SIZE)
    assert (other / "p00001_s1.dcm").read_bytes() != (base / "p00001_s1.dcm").read_bytes()


def test_csv_and_files_consistent(cohorts):
    base, _, _ = cohorts
    rows = _rows(base)
    assert list(rows[0].keys()) == CSV_COLUMNS
    assert len(rows) > N  # some patients have several studies
    per_patient = {}
    for r in rows:
        per_patient.setdefault(r["patient_id"], set()).add(r["label"])
        assert (base / r["filename"]).is_file()
        parse_vitals(r)  # every value is inside the valid ranges
        assert r["variant"] == ""
    assert all(len(v) == 1 for v in per_patient.values())  # one label per patient
    assert max(sum(r["patient_id"] == p for r in rows) for p in per_patient) >= 2
    labels = [next(iter(v)) for v in per_patient.values()]
    assert labels.count("covid19") == 12 and labels.count("other_pneumonia") == 9 and labels.count("normal") == 9
    assert len({r["site"] for r in rows}) >= 3
    vital_cells = [r[f] for r in rows for f in CSV_COLUMNS[8:13]]
    missing = sum(c == "" for c in vital_cells) / len(vital_cells)
    assert 0.1 <= missing <= 0.3


def test_real_dicom_mixed_encodings_with_fake_phi(cohorts):
    base, _, _ = cohorts
    syntaxes, photometrics, bits, modalities = set(), set(), set(), set()
    rows = {r["filename"]: r for r in _rows(base)}
    for path in sorted(base.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        syntaxes.add(ds.file_meta.TransferSyntaxUID.keyword)
        photometrics.add(ds.PhotometricInterpretation)
        bits.add(int(ds.BitsStored))
        modalities.add(ds.Modality)
        assert str(ds.PatientName) and ds.PatientID == rows[path.name]["patient_id"] and ds.AccessionNumber
        assert ds.StudyDate == rows[path.name]["study_date"].replace("-", "")
        img = decode_dicom(path)
        assert img.shape[0] == SIZE and img.view == rows[path.name]["view"] and not img.warnings
    assert len(syntaxes) >= 5, syntaxes
    assert {"MONOCHROME1", "MONOCHROME2"} <= photometrics
    assert {"CR", "DX"} <= modalities
    assert min(bits) <= 10 and max(bits) >= 14


def test_class_signal_in_images(cohorts):
    base, _, _ = cohorts
    z = {k: np.array(v) for k, v in _zones(base).items()}
    # covid19: bilateral peripheral lower-zone opacities → brighter lower zones than normal
    assert z["covid19"][:, 0].mean() > z["normal"][:, 0].mean() + 0.08
    # other_pneumonia: unilateral consolidation → left/right asymmetry
    assert z["other_pneumonia"][:, 2].mean() > 2 * z["normal"][:, 2].mean()
    assert z["covid19"][:, 2].mean() < z["other_pneumonia"][:, 2].mean()


def test_class_signal_in_vitals(cohorts):
    base, _, _ = cohorts
    rows = _rows(base)

    def mean(label, f):
        xs = [float(r[f]) for r in rows if r["label"] == label and r[f] != ""]
        return sum(xs) / len(xs)

    assert mean("covid19", "temperature_c") > mean("normal", "temperature_c") + 1.0
    assert mean("covid19", "spo2_percent") < mean("normal", "spo2_percent") - 3
    assert mean("other_pneumonia", "heart_rate_bpm") > mean("normal", "heart_rate_bpm") + 15


def test_variant_shifts_images_and_vitals(cohorts):
    base, _, omicron = cohorts
    zb = {k: np.array(v) for k, v in _zones(base).items()}
    zo = {k: np.array(v) for k, v in _zones(omicron).items()}
    gap_base = zb["covid19"][:, 0].mean() - zb["normal"][:, 0].mean()
    gap_omicron = zo["covid19"][:, 0].mean() - zo["normal"][:, 0].mean()
    assert gap_omicron < gap_base / 2  # the lower-zone pattern a base model learnt is mostly gone
    assert zo["covid19"][:, 1].mean() > zo["normal"][:, 1].mean() + 0.02  # opacities moved up/central
    rows_b, rows_o = _rows(base), _rows(omicron)
    assert {r["variant"] for r in rows_o} == {"omicron"}

    def spo2(rows):
        xs = [float(r["spo2_percent"]) for r in rows if r["label"] == "covid19" and r["spo2_percent"]]
        return sum(xs) / len(xs)

    assert spo2(rows_o) > spo2(rows_b) + 3
    assert min(r["study_date"] for r in rows_o) > max(r["study_date"] for r in rows_b)


def test_unknown_variant_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown variant"):
        synthesize_cohort(2, tmp_path, variant="nonesuch")
    with pytest.raises(ValueError):
        synthesize_cohort(0, tmp_path)


def test_rerun_into_same_folder_stays_consistent(tmp_path):
    synthesize_cohort(6, tmp_path, seed=2, image_size=48)
    (tmp_path / "keep_me.txt").write_text("user file")
    synthesize_cohort(2, tmp_path, seed=2, image_size=48)
    listed = {r["filename"] for r in _rows(tmp_path)}
    assert {p.name for p in tmp_path.glob("*.dcm")} == listed
    assert (tmp_path / "keep_me.txt").exists()
