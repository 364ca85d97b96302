"""DICOM-folder import: validation, rejection reasons, de-identification (no PHI in any output)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

PLANTED_NAME = "Quixotebottom^Zebulon"
PLANTED_ID = "PLANTED-PID-93817"
PLANTED_ACCESSION = "ACCPLANT55120"
PLANTED_STUDY_UID = "1.2.826.0.1.3680043.8.498.771234567890123"
PLANTED_DATE = "20200314"

VITAL_HEADER = ["filename", "patient_id", "label", "site", "study_date", "view", "sex", "age_years",
                "temperature_c", "spo2_percent", "heart_rate_bpm", "respiratory_rate",
                "systolic_bp_mmhg", "variant"]


def write_dicom(path: Path, *, seed: int, patient_id: str, patient_name: str = "Doe^Jane",
                accession: str = "A1", study_uid: str | None = None, view: str = "PA",
                modality: str = "CR", study_date: str = "20200101", size: int = 96) -> Path:
    """A small real DICOM file (uncompressed, 12-bit, MONOCHROME2) with a seeded pattern."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    img = (1500 + 800 * np.sin(xx / (3 + seed % 5)) + 600 * np.cos(yy / 7) + rng.normal(0, 60, (size, size)))
    img = np.clip(img, 0, 4095).astype(np.uint16)
    sop_class = "1.2.840.10008.5.1.4.1.1.1" if modality == "CR" else "1.2.840.10008.5.1.4.1.1.1.1"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.AccessionNumber = accession
    ds.StudyDate = study_date
    ds.PatientSex = "F"
    ds.PatientAge = "054Y"
    ds.InstitutionName = "Test Hospital"
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.Rows, ds.Columns = size, size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = img.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def vitals_row(filename, patient_id, label, **over):
    row = {"filename": filename, "patient_id": patient_id, "label": label, "site": "site-a",
           "study_date": "2021-02-03", "view": "PA", "sex": "F", "age_years": "54", "temperature_c": "37.2",
           "spo2_percent": "97", "heart_rate_bpm": "80", "respiratory_rate": "16", "systolic_bp_mmhg": "120",
           "variant": ""}
    row.update(over)
    return row


def build_folder(folder: Path) -> list[dict]:
    """10 index rows: 7 good, 1 bad vitals, 1 not DICOM, 1 lateral; plus one duplicate image."""
    folder.mkdir(parents=True)
    rows = []
    labels = ["covid19", "normal", "other_pneumonia", "covid19", "normal", "other_pneumonia"]
    for i in range(6):
        pid = PLANTED_ID if i == 0 else f"SRC-{i:03d}"
        fn = f"img_{i:02d}.dcm"
        write_dicom(folder / fn, seed=i, patient_id=pid,
                    patient_name=PLANTED_NAME if i == 0 else f"Person^{i}",
                    accession=PLANTED_ACCESSION if i == 0 else f"A{i}",
                    study_uid=PLANTED_STUDY_UID if i == 0 else None, study_date=PLANTED_DATE)
        rows.append(vitals_row(fn, pid, labels[i], site="site-a" if i % 2 else "site-b",
                               study_date="2020-03-14"))
    # duplicate of img_01 under a different patient
    (folder / "dup_of_01.dcm").write_bytes((folder / "img_01.dcm").read_bytes())
    rows.append(vitals_row("dup_of_01.dcm", "SRC-900", "normal"))
    # out-of-range SpO2 (not clipped: rejected)
    write_dicom(folder / "bad_vitals.dcm", seed=20, patient_id="SRC-901")
    rows.append(vitals_row("bad_vitals.dcm", "SRC-901", "covid19", spo2_percent="130"))
    # not a DICOM file
    (folder / "notes.dcm").write_text("this is not a DICOM file")
    rows.append(vitals_row("notes.dcm", "SRC-902", "covid19"))
    # lateral view
    write_dicom(folder / "lateral.dcm", seed=21, patient_id="SRC-903", view="LL")
    rows.append(vitals_row("lateral.dcm", "SRC-903", "covid19", view="LL"))
    with open(folder / "vitals.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=VITAL_HEADER)
        w.writeheader()
        w.writerows(rows)
    return rows


def _all_output_files(*roots: Path) -> list[Path]:
    return [p for r in roots if r.exists() for p in r.rglob("*") if p.is_file()]


def _read_if_present(path: Path) -> bytes:
    """A file's bytes, or b"" when it vanished since the listing: SQLite's rollback journal
    (``*.db-journal``) lives only for one transaction, and a background thread of the same
    process (an API module's champion poller, torn down at its module's end) may commit in
    between. Its content lands in the database file, which is scanned too."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def test_dicom_import_validates_deidentifies_and_splits(cxr_env: Path):
    import typer
    from typer.testing import CliRunner

    from app.cli.data_import import register_data_commands
    from compliance.audit import list_events, verify_chain
    from models.datasets import load_dataset

    src = cxr_env / "source"
    rows = build_folder(src)
    # through the CLI (its console output is a "log" that must hold no PHI either); the project
    # root is not a git repo here, so DVC runs with --no-scm and pushes to the local remote
    app = typer.Typer()
    register_data_commands(app)

    @app.callback()
    def _root():
        pass

    res = CliRunner().invoke(app, ["import", str(src), "--name", "dcm", "--seed", "3", "--as", "tester",
                                   "--workers", "1"])
    assert res.exit_code == 0, res.output
    for word in ("covid19", "vitals-out-of-range", "not-dicom", "lateral-view", "duplicate-image"):
        assert word in res.output
    assert (cxr_env / "project" / "data" / "dcm.dvc").exists()
    assert any((cxr_env / "home" / "dvc-remote").rglob("*"))

    ds = load_dataset("dcm")
    man = ds.manifest
    rej = pd.read_csv(ds.root / "rejected.csv", dtype=str, keep_default_na=False)
    assert len(man) == 6 and len(rej) == 4
    codes = dict(zip(rej["source_row"].astype(int), rej["code"]))
    assert codes == {7: "duplicate-image", 8: "vitals-out-of-range", 9: "not-dicom", 10: "lateral-view"}
    reasons = dict(zip(rej["source_row"].astype(int), rej["reason"]))
    assert "spo2" in reasons[8].lower() and "130" in reasons[8]
    twin = man[man["source_row"] == 2].iloc[0]
    assert "row 2" in reasons[7] and twin["patient_id"] in reasons[7]
    assert rej.set_index("source_row").loc["7", "duplicate_of_patient"] == twin["patient_id"]
    assert all(r for r in rej["reason"])

    # contract columns and types
    for col in ("image_hash", "patient_id", "split", "label", "view", "site", "source", "variant", "sex",
                "temperature_c", "spo2_percent", "heart_rate_bpm", "respiratory_rate", "systolic_bp_mmhg",
                "age_years", "study_date", "array_path"):
        assert col in man.columns, col
    assert set(man["label"]) == {"covid19", "normal", "other_pneumonia"}
    assert set(man["site"]) == {"site-a", "site-b"}
    arr = np.load(ds.root / man.iloc[0]["array_path"])
    assert arr.dtype == np.float16 and arr.shape == (1, 256, 256)
    assert 0.0 <= float(arr.min()) and float(arr.max()) <= 1.0
    # patient-level split; dates shifted 1..365 days back
    assert man.groupby("patient_id")["split"].nunique().max() == 1
    assert man.groupby("image_hash")["split"].nunique().max() == 1
    assert man["image_hash"].is_unique
    for d in man["study_date"]:
        delta = (pd.Timestamp("2020-03-14") - pd.Timestamp(d)).days
        assert 1 <= delta <= 365
    assert all(p.startswith("p-") and len(p) == 18 for p in man["patient_id"])
    # the kept UID is remapped, consistently
    assert not man["study_uid"].str.contains(PLANTED_STUDY_UID, regex=False).any()
    assert man.loc[man["source_row"] == 1, "study_uid"].iloc[0].startswith("2.25.")

    # no PHI in ANY output file: manifest, rejected.csv, arrays, logs, secrets dir aside, audit DB
    planted = [PLANTED_NAME, "Quixotebottom", "Zebulon", PLANTED_ID, PLANTED_ACCESSION, PLANTED_STUDY_UID,
               PLANTED_DATE, "2020-03-14", "Person^1", "SRC-001", "SRC-900"]
    files = _all_output_files(cxr_env / "project", cxr_env / "home")
    assert any(f.name == "manifest.parquet" for f in files) and any(f.suffix == ".db" for f in files)
    assert len([f for f in files if f.suffix == ".npy"]) == 6
    for f in files:
        blob = _read_if_present(f)
        for s in planted:
            assert s.encode() not in blob, f"{s!r} found in {f}"
    for s in planted:
        assert s not in res.output

    # audit: counts only, chain intact
    events = [e for e in list_events(None, None, "dataset.imported")]
    assert len(events) == 1, "dataset.imported not recorded exactly once"
    ev = events[0]
    assert ev["actor"] == "tester" and ev["subject"] == "dataset:dcm"
    d = ev["details"]
    assert d["name"] == "dcm" and d["batch"] == 0
    assert (d["n_input"], d["n_accepted"], d["n_rejected"]) == (len(rows), 6, 4) == (10, 6, 4)
    assert d["by_code"] == {"duplicate-image": 1, "vitals-out-of-range": 1, "not-dicom": 1, "lateral-view": 1}
    assert d["by_label"] == {"covid19": 2, "normal": 2, "other_pneumonia": 2}
    assert d["by_site"] == {"site-a": 3, "site-b": 3}
    assert d["by_view"] == {"PA": 6}
    assert d["by_split"] == man["split"].value_counts().to_dict() and sum(d["by_split"].values()) == 6
    assert d["n_patients"] == man["patient_id"].nunique() == 6
    assert verify_chain().ok


def test_plain_dicom_folder_without_index(cxr_env: Path):
    from models.datasets import load_dataset
    from pipelines.ingest import import_dataset

    src = cxr_env / "plain"
    src.mkdir()
    write_dicom(src / "a.dcm", seed=1, patient_id="HDR-1")
    write_dicom(src / "b.dcm", seed=2, patient_id="HDR-1")
    (src / "readme-not-dicom.txt").write_text("hello")
    s = import_dataset(src, "plain", seed=1, actor="tester", track=False, workers=1, quiet=True)
    assert (s.n_input, s.n_accepted, s.n_rejected) == (3, 2, 1)
    man = load_dataset("plain").manifest
    assert set(man["label"]) == {"unlabeled"}
    assert man["patient_id"].nunique() == 1 and "HDR-1" not in man["patient_id"].iloc[0]
    assert set(man["site"]) == {"Test Hospital"}  # InstitutionName kept as the site label
    rej = pd.read_csv(load_dataset("plain").root / "rejected.csv")
    assert list(rej["code"]) == ["not-dicom"]


def test_cli_errors_are_messages_not_tracebacks(cxr_env: Path):
    import typer
    from typer.testing import CliRunner

    from app.cli.data_import import register_data_commands

    app = typer.Typer()
    register_data_commands(app)
    runner = CliRunner()
    res = runner.invoke(app, ["import", str(cxr_env / "nope"), "--name", "x"])
    assert res.exit_code != 0
    assert "does not exist" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["import", str(cxr_env), "--name", "bad/name"])
    assert res.exit_code != 0 and "invalid dataset name" in res.output
    res = runner.invoke(app, ["add-batch", str(cxr_env), "--to", "missing", "--tag", "v2"])
    assert res.exit_code != 0 and "not found" in res.output


def test_synthetic_cohort_headers_leave_no_trace(cxr_env: Path):
    """Every identifying header value the synthetic cohort writes (names, ids, accession numbers,
    birth dates, UIDs, institution) is absent from every output file."""
    import pydicom

    from models.datasets import load_dataset
    from pipelines.ingest import import_dataset
    from pipelines.synth import synthesize_cohort

    src = cxr_env / "synth"
    synthesize_cohort(8, src, seed=5, image_size=96)
    secrets: set[str] = set()
    for p in src.glob("*.dcm"):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        for kw in ("PatientName", "ReferringPhysicianName"):
            name = str(ds.get(kw, "") or "")
            secrets |= {part for part in name.split("^") if len(part) >= 4}
        for kw in ("PatientID", "AccessionNumber", "PatientBirthDate", "StudyInstanceUID", "SOPInstanceUID",
                   "SeriesInstanceUID", "InstitutionName"):
            v = str(ds.get(kw, "") or "")
            if len(v) >= 6:
                secrets.add(v)
    with open(src / "vitals.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    secrets |= {r["patient_id"] for r in rows if len(r["patient_id"]) >= 6}
    assert len(secrets) > 20
    s = import_dataset(src, "syn", seed=1, actor="tester", track=False, workers=1, quiet=True)
    assert s.n_input == len(rows) and s.n_accepted + s.n_rejected == len(rows)
    assert s.n_accepted >= len(rows) - 2, s.by_code
    man = load_dataset("syn").manifest
    assert man.groupby("patient_id")["split"].nunique().max() == 1
    for blob_path in _all_output_files(cxr_env / "project", cxr_env / "home"):
        blob = _read_if_present(blob_path)
        for secret in secrets:
            assert secret.encode() not in blob, f"{secret!r} found in {blob_path}"
    # dates shifted, per patient by one constant offset
    offsets = {}
    by_row = {i: r for i, r in enumerate(rows, start=1)}
    for rec in man.itertuples():
        real = pd.Timestamp(by_row[rec.source_row]["study_date"])
        delta = (real - pd.Timestamp(rec.study_date)).days
        assert 1 <= delta <= 365
        offsets.setdefault(rec.patient_id, set()).add(delta)
    assert all(len(v) == 1 for v in offsets.values())


def test_labels_sidecar_and_unknown_label(cxr_env: Path):
    from models.datasets import load_dataset
    from pipelines.ingest import import_dataset, map_finding

    src = cxr_env / "side"
    src.mkdir()
    for i in range(3):
        write_dicom(src / f"s{i}.dcm", seed=40 + i, patient_id=f"SIDE-{i}")
    (src / "labels.csv").write_text("filename,label\ns0.dcm,covid19\ns1.dcm,banana\n")
    s = import_dataset(src, "side", seed=1, actor="tester", track=False, workers=1, quiet=True)
    assert (s.n_input, s.n_accepted, s.n_rejected) == (3, 2, 1)
    man = load_dataset("side").manifest.sort_values("source_row")
    assert list(man["label"]) == ["covid19", "unlabeled"]  # s2.dcm is not in the sidecar
    rej = pd.read_csv(load_dataset("side").root / "rejected.csv")
    assert list(rej["code"]) == ["unknown-label"] and "banana" in rej["reason"].iloc[0]
    # the public collection's free-text findings
    assert map_finding("COVID-19, ARDS") == "covid19" and map_finding("No Finding") == "normal"
    assert map_finding("Streptococcus") == "other_pneumonia" and map_finding("todo") == "unlabeled"
    assert map_finding("Lipoid") == map_finding("SARS") == map_finding("ARDS") == "other_pneumonia"
    assert map_finding("", free_text=False) == "unlabeled" and map_finding("banana", free_text=False) is None


def test_index_file_names_are_confined_to_the_source_folder(cxr_env: Path):
    """An index row naming `../x.dcm`, an absolute path or a link out of the folder is rejected with a
    reason in rejected.csv; the outside file (a valid DICOM) is never read into the dataset."""
    from models.datasets import load_dataset
    from pipelines.ingest import import_dataset

    outside = cxr_env / "outside"
    outside.mkdir()
    secret = write_dicom(outside / "secret.dcm", seed=7, patient_id="OUTSIDE-1")
    src = cxr_env / "confined"
    src.mkdir()
    write_dicom(src / "ok.dcm", seed=1, patient_id="IN-1")
    (src / "sub").mkdir()
    (src / "sub" / "link.dcm").symlink_to(secret)
    rows = [vitals_row("ok.dcm", "IN-1", "normal"),
            vitals_row("../outside/secret.dcm", "P-2", "covid19"),
            vitals_row(str(secret), "P-3", "covid19"),
            vitals_row("sub/../../outside/secret.dcm", "P-4", "covid19"),
            vitals_row("sub/link.dcm", "P-5", "covid19")]
    with open(src / "vitals.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=VITAL_HEADER)
        w.writeheader()
        w.writerows(rows)
    s = import_dataset(src, "confined", seed=1, actor="tester", track=False, workers=1, quiet=True)
    assert s.n_accepted == 1, s
    ds = load_dataset("confined")
    assert len(ds.manifest) == 1
    rej = pd.read_csv(ds.root / "rejected.csv", dtype=str, keep_default_na=False)
    outside_rows = rej[rej["code"] == "path-outside-source"]
    assert len(outside_rows) == 4, rej[["code", "reason"]].to_string()
    reasons = " ".join(outside_rows["reason"])
    assert "absolute" in reasons and "'..'" in reasons and "outside the source folder" in reasons
    assert "OUTSIDE-1" not in (ds.root / "rejected.csv").read_text()
