"""Near-duplicate-safe splits and provenance-decided external validation (issue 13).

A small public-layout folder (metadata.csv + PNGs) where one radiograph is listed again, resized and
re-windowed, under another patient: the import must find the pair, link both patients into one split
group and list the pair in its summary. Importing the same folder under a second name must not count
as external validation of a model trained on the first.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

N_BASE = 14


def _smooth_image(rng: np.random.Generator, size: int = 320) -> np.ndarray:
    """A random low-frequency grayscale picture (distinct pHash per seed)."""
    coarse = rng.random((6, 6)).astype(np.float32)
    img = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    img = (img - img.min()) / (np.ptp(img) + 1e-6)
    return (img * 220 + 20).astype(np.uint8)


def _public_folder(root: Path) -> Path:
    rng = np.random.default_rng(3)
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(N_BASE):
        Image.fromarray(_smooth_image(rng)).save(root / "images" / f"img{i}.png")
        rows.append({"patientid": str(100 + i), "finding": "COVID-19" if i % 2 == 0 else "Pneumonia", "view": "PA",
                     "modality": "X-ray", "location": f"Hospital {i % 3}", "filename": f"img{i}.png",
                     "url": "https://radiopaedia.org/cases/x" if i % 2 else "https://www.eurorad.org/case/y"})
    # img0 again: resized to 280 px and slightly brighter, under another patient (a near duplicate)
    base = np.asarray(Image.open(root / "images" / "img0.png"), dtype=np.float32)
    twin = np.clip(np.asarray(Image.fromarray(base).resize((280, 280), Image.Resampling.BILINEAR)) * 1.05 + 4, 0, 255)
    Image.fromarray(twin.astype(np.uint8)).save(root / "images" / "img0-copy.png")
    rows.append({"patientid": "999", "finding": "COVID-19", "view": "PA", "modality": "X-ray",
                 "location": "Hospital 0", "filename": "img0-copy.png", "url": ""})
    cols = ["patientid", "offset", "sex", "age", "finding", "view", "modality", "date", "location", "filename",
            "doi", "url", "license", "clinical_notes", "other_notes", "temperature", "pO2_saturation"]
    with open(root / "metadata.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in cols})
    return root


def test_phash_pairs_and_hamming():
    from models.provenance import hamming, near_pairs, phash_bits
    from pipelines.near_duplicates import phash_of_array

    rng = np.random.default_rng(0)
    a = _smooth_image(rng).astype(np.float32) / 255
    b = _smooth_image(rng).astype(np.float32) / 255
    ha, hb = phash_of_array(a[None]), phash_of_array(b[None])
    ha2 = phash_of_array(np.clip(a * 1.03 + 0.01, 0, 1)[None])
    assert len(ha) == 16
    assert hamming(phash_bits([ha]), phash_bits([ha2]))[0, 0] <= 4
    assert hamming(phash_bits([ha]), phash_bits([hb]))[0, 0] > 10
    assert [(i, j) for i, j, _ in near_pairs([ha, hb, ha2])] == [(0, 2)]
    assert near_pairs([ha, ""], [ha]) == [(0, 0, 0)]  # blanks never match


def test_import_links_near_duplicates_into_one_split_group(cxr_env: Path, tmp_path: Path):
    import pandas as pd

    from pipelines.ingest import import_dataset

    src = _public_folder(tmp_path / "src")
    s = import_dataset(src, "nd", seed=1, actor="tester", track=False, quiet=True, workers=1)
    assert s.n_accepted == N_BASE + 1, s.by_code
    man = pd.read_parquet(cxr_env / "project" / "data" / "nd" / "manifest.parquet")
    assert {"phash", "origin", "label_source"} <= set(man.columns)
    pairs = s.near_duplicate_pairs
    assert len(pairs) == 1, pairs
    p = pairs[0]
    assert {p["row_a"], p["row_b"]} == {1, N_BASE + 1} and p["distance"] <= 6
    assert p["split_a"] == p["split_b"]
    twins = man[man["source_row"].isin([1, N_BASE + 1])]
    assert twins["split_group"].nunique() == 1 and twins["split"].nunique() == 1
    assert man.groupby("split_group")["split"].nunique().max() == 1
    assert s.counts()["n_near_duplicate_pairs"] == 1
    assert set(man["origin"]) == {"radiopaedia.org", "eurorad.org", ""}
    assert set(man["label_source"]) == {"publication"}


def test_same_folder_under_two_names_is_not_external(cxr_env: Path, tmp_path: Path):
    import pandas as pd

    from models.provenance import external_status
    from pipelines.ingest import import_dataset

    src = _public_folder(tmp_path / "src")
    import_dataset(src, "orig", seed=1, actor="tester", track=False, quiet=True, workers=1)
    import_dataset(src, "copy", seed=2, actor="tester", track=False, quiet=True, workers=1)
    data = cxr_env / "project" / "data"
    a, b = (pd.read_parquet(data / n / "manifest.parquet") for n in ("orig", "copy"))
    st = external_status(a, b)
    assert st["is_external"] is False
    text = " ".join(st["reasons"])
    assert "source" in text and "site" in text and "identical to training images" in text
    assert st["exact_duplicate_images"] == len(b)

    # a different provider, other sites, other pictures: external
    other = b.copy()
    other["source"], other["origin"] = "hospital-x", ""
    other["site"] = [f"X {i}" for i in range(len(other))]
    other["image_hash"] = [f"h{i}" for i in range(len(other))]
    other["phash"] = [f"{(0x0F0F0F0F0F0F0F0F ^ (i * 0x1111)):016x}" for i in range(len(other))]
    assert external_status(a, other)["is_external"] is True
    # ... but one near-duplicate picture makes it internal, with the reason
    other.loc[0, "phash"] = a["phash"].iloc[3]
    st2 = external_status(a, other)
    assert st2["is_external"] is False and st2["near_duplicate_images"] == 1
    assert any("near-duplicate" in r for r in st2["reasons"])
    # an old manifest without perceptual hashes cannot be verified
    assert external_status(a.drop(columns=["phash"]), other)["is_external"] is False


def test_policy_does_not_count_an_internal_dataset_as_external():
    from compliance.policy import evaluate_policy

    prov_no = {"is_external": False, "reasons": ["shares source(s) with the training data: dicom"]}
    ext = {"n_patients": 30, "covid19_vs_rest": {"auroc": {"value": 0.9, "ci_low": 0.8, "ci_high": 0.95}},
           "provenance": prov_no}
    res = evaluate_policy({"external": {"copy": ext}}, {})
    crit = {c.id: c for c in res.criteria}["external-validation"]
    assert not crit.passed
    assert "copy not counted (internal: shares source(s) with the training data: dicom)" in crit.note
    res2 = evaluate_policy({"external": {"copy": dict(ext, provenance={"is_external": True, "reasons": []})}}, {})
    assert {c.id: c for c in res2.criteria}["external-validation"].passed
    legacy = {k: v for k, v in ext.items() if k != "provenance"}
    crit3 = {c.id: c for c in evaluate_policy({"external": {"old": legacy}}, {}).criteria}["external-validation"]
    assert not crit3.passed and "no provenance verdict" in crit3.note


def test_link_distance_tightens_when_the_hash_cannot_tell_images_apart():
    """Smooth synthetic phantoms are within 6 bits of each other by the hundred: linking them all would put
    the whole cohort in one split group. The threshold tightens until pairs are at most 10 % of images."""
    from pipelines.ingest import choose_link_distance

    assert choose_link_distance([0, 2, 4, 6] * 3, 494) == 6  # the public collection's situation
    many = [6] * 80 + [4] * 30 + [2] * 13 + [0] * 3
    assert choose_link_distance(many, 55) == 0
    assert choose_link_distance([0] * 50, 55) == -1  # nothing linked
    assert choose_link_distance([], 10) == 6
