"""Drift on real synthetic cohorts (pipelines.synth, decoded by models.preprocessing): the variant
cohort raises the exported ``cxr_drift_psi`` above the alert threshold, an in-distribution cohort
of the same generator stays below it on every feature."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app import metrics as m
from models import preprocessing
from pipelines import synth

IMAGE_SIZE = 64       # synthetic radiograph rows; small keeps the test quick
PREPARED = 64         # prepared array side (the API uses 256; the histogram is per pixel fraction)


def _load(folder: Path):
    import pandas as pd

    frame = pd.read_csv(folder / "vitals.csv")
    images = {p.name: preprocessing.prepare_image(preprocessing.decode_dicom(p).pixels, size=PREPARED)
              for p in synth.iter_dicom_files(folder)}
    rows = []
    for _, row in frame.iterrows():
        vitals = {f: (None if pd.isna(row.get(f)) else float(row[f])) for f in preprocessing.VITAL_FIELDS}
        rows.append((str(row["patient_id"]), vitals, images[row["filename"]]))
    return rows


def _reference(rows) -> dict:
    """As models/train.py builds it: 10 bins from the deciles per vital, 20 pixel-intensity bins."""
    ref = {"vitals": {}}
    for field in preprocessing.VITAL_FIELDS:
        values = np.array([v[field] for _, v, _ in rows if v[field] is not None])
        edges = [values.min() - 1, *np.unique(np.quantile(values, np.linspace(0.1, 0.9, 9))), values.max() + 1]
        counts, _ = np.histogram(values, edges)
        ref["vitals"][field] = {"edges": [float(e) for e in edges], "fractions": (counts / counts.sum()).tolist()}
    edges = np.linspace(0, 1, 21)
    counts = sum(np.histogram(np.clip(img, 0, 1), edges)[0] for _, _, img in rows)
    ref["image_intensity"] = {"edges": edges.tolist(), "fractions": (counts / counts.sum()).tolist(), "unit": "pixel"}
    ref["ood"] = {"threshold": None}
    return ref


def _exported_psi(version: str) -> dict[str, float]:
    body, _ = m.metrics_payload()
    return {s.labels["feature"]: s.value for fam in text_string_to_metric_families(body.decode())
            if fam.name == "cxr_drift_psi" for s in fam.samples if s.labels["model_version"] == version}


@pytest.mark.slow
def test_variant_cohort_raises_psi_in_distribution_cohort_does_not(tmp_path):
    synth.synthesize_cohort(420, tmp_path / "base", seed=11, image_size=IMAGE_SIZE)
    synth.synthesize_cohort(150, tmp_path / "omicron", seed=12, variant="omicron", image_size=IMAGE_SIZE)
    base = _load(tmp_path / "base")
    variant = _load(tmp_path / "omicron")
    # split the base cohort by patient: the first ~60 % is the "training" reference
    patients = sorted({p for p, _, _ in base})
    train_patients = set(patients[: int(len(patients) * 0.6)])
    train = [r for r in base if r[0] in train_patients]
    held_out = [r for r in base if r[0] not in train_patients]
    assert len(held_out) >= 200 and len(variant) >= 200, (len(held_out), len(variant))
    reference = _reference(train)

    try:
        m.configure_drift(reference, "901", window=200, min_samples=100)
        for _, vitals, image in held_out:
            m.record_prediction("normal", "covid19-negative", "901", "drift-test", vitals=vitals, image=image)
        in_dist = _exported_psi("901")
        assert set(in_dist) == set(preprocessing.VITAL_FIELDS) | {"image_intensity"}
        assert max(in_dist.values()) < m.PSI_ALERT_THRESHOLD, in_dist

        m.configure_drift(reference, "902", window=200, min_samples=100)  # a fresh window
        for _, vitals, image in variant:
            m.record_prediction("covid19", "covid19-positive", "902", "drift-test", vitals=vitals, image=image)
        shifted = _exported_psi("902")
        assert shifted["image_intensity"] > m.PSI_ALERT_THRESHOLD, shifted
        assert max(v for f, v in shifted.items() if f != "image_intensity") > m.PSI_ALERT_THRESHOLD, shifted
        assert not _exported_psi("901")  # the switch removed the old version's gauges
    finally:
        m.configure_drift(None, "902")
