"""Test helpers for the model tests: a small dataset written in the documented on-disk format.

``write_synthetic_dataset(project_root, name)`` writes ``data/<name>/manifest.parquet`` + ``arrays/<hash>.npy``
(float16 (1, 256, 256)) + ``rejected.csv`` exactly as docs/INTERFACES.md specifies, with a learnable
signal: covid19 = bilateral peripheral lower-zone opacities, other_pneumonia = one dense lobar
opacity, normal = clear lungs; vitals shifted per class (SpO2, temperature) with ~20 % missing.
``unlabeled`` rows carry NaN pixels, so training on them would poison the weights.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

FIELDS = ["temperature_c", "spo2_percent", "heart_rate_bpm", "respiratory_rate", "systolic_bp_mmhg", "age_years"]
CLASSES = ["covid19", "other_pneumonia", "normal"]


def _blob(yy, xx, cy, cx, sy, sx):
    return np.exp(-(((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))


def synth_image(label: str, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    img = 0.55 + 0.1 * rng.standard_normal() * 0 + 0.05 * yy
    lungs = _blob(yy, xx, 0.5, 0.3, 0.3, 0.13) + _blob(yy, xx, 0.5, 0.7, 0.3, 0.13)
    img = img - 0.35 * np.clip(lungs, 0, 1)
    if label == "covid19":
        for cx in (0.2, 0.8):
            img += 0.3 * _blob(yy, xx, 0.65 + 0.05 * rng.standard_normal(), cx + 0.03 * rng.standard_normal(), 0.1, 0.06)
    elif label == "other_pneumonia":
        cx = 0.3 if rng.random() < 0.5 else 0.7
        cy = 0.35 if rng.random() < 0.5 else 0.62
        img += 0.35 * _blob(yy, xx, cy, cx + 0.03 * rng.standard_normal(), 0.09, 0.09)
    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05)
    img = img + 0.03 * rng.standard_normal(img.shape)
    return np.clip(img, 0, 1)[None].astype(np.float16)


def synth_vitals(label: str, rng: np.random.Generator) -> dict:
    spo2, temp = {"covid19": (91, 38.2), "other_pneumonia": (94, 38.5), "normal": (97.5, 36.9)}[label]
    v = {"temperature_c": temp + 0.6 * rng.standard_normal(), "spo2_percent": min(100.0, spo2 + 2.5 * rng.standard_normal()),
         "heart_rate_bpm": 85 + 12 * rng.standard_normal(), "respiratory_rate": 18 + 4 * rng.standard_normal(),
         "systolic_bp_mmhg": 125 + 15 * rng.standard_normal(), "age_years": float(rng.integers(20, 90))}
    for f in FIELDS:
        if rng.random() < 0.2:
            v[f] = np.nan
    return v


def phash_of_array(arr):
    from pipelines.near_duplicates import phash_of_array as f

    return f(arr)


def write_synthetic_dataset(project_root: Path, name: str = "synthtest", *, n_patients: int = 90, seed: int = 0,
                            n_unlabeled: int = 4, site: str = "site-a", variant: str = "",
                            source: str = "synthetic") -> Path:
    rng = np.random.default_rng(seed)
    root = Path(project_root) / "data" / name
    (root / "arrays").mkdir(parents=True, exist_ok=True)
    rows = []
    for p in range(n_patients):
        label = CLASSES[p % 3]
        split = ("train", "train", "train", "val", "test")[(p // 3) % 5]
        pid = hashlib.sha256(f"{name}-{seed}-{p}".encode()).hexdigest()[:16]
        for k in range(1 + (p % 4 == 0)):
            arr = synth_image(label, rng)
            h = hashlib.sha256(arr.tobytes()).hexdigest()
            np.save(root / "arrays" / f"{h}.npy", arr)
            rows.append({"image_hash": h, "phash": phash_of_array(arr), "patient_id": pid, "split": split, "label": label,
                         "view": "PA" if rng.random() < 0.7 else "AP", "site": site, "source": source,
                         "variant": variant, "sex": "M" if rng.random() < 0.5 else "F",
                         **synth_vitals(label, rng), "study_date": "2020-03-01", "array_path": f"arrays/{h}.npy"})
    for u in range(n_unlabeled):
        arr = np.full((1, 256, 256), np.nan, dtype=np.float16)
        arr[0, 0, u] = 0  # distinct content
        h = hashlib.sha256(arr.tobytes()).hexdigest()
        np.save(root / "arrays" / f"{h}.npy", arr)
        rows.append({"image_hash": h, "phash": "", "patient_id": f"unl{u}", "split": "train", "label": "unlabeled", "view": "PA",
                     "site": site, "source": source, "variant": variant, "sex": "unknown",
                     **{f: np.nan for f in FIELDS}, "study_date": "2020-03-01", "array_path": f"arrays/{h}.npy"})
    pd.DataFrame(rows).to_parquet(root / "manifest.parquet", index=False)
    pd.DataFrame(columns=["source_row", "reason", "code"]).to_csv(root / "rejected.csv", index=False)
    return root
