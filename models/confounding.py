"""Site/source ↔ label association in a dataset (Cramér's V with the counts it comes from).

Used by the dataset summary at import (``pipelines.ingest``) and by the evaluation's shortcut
section. Light: numpy only (no torch), so the import path stays fast.

``cramers_v(a, b)`` → ``{"v", "chi2", "dof", "n", "n_rows", "n_cols", "table": {a_value: {b_value: count}}}``
with the bias-corrected estimator (Bergsma 2013) as ``v_corrected``. ``confounding_summary(manifest)``
does it for ``site`` and ``source`` against the label (labelled rows only), adds single-label site
counts and a warning when the association is strong (``STRONG_V``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

STRONG_V = 0.5      # conventional "strong" association for a nominal pair
MODERATE_V = 0.3
LABELS = ("covid19", "other_pneumonia", "normal")


def cramers_v(a: Sequence, b: Sequence) -> dict:
    a = np.asarray([str(x) for x in a], dtype=object)
    b = np.asarray([str(x) for x in b], dtype=object)
    ra, ia = np.unique(a, return_inverse=True)
    rb, ib = np.unique(b, return_inverse=True)
    table = np.zeros((len(ra), len(rb)), dtype=float)
    np.add.at(table, (ia, ib), 1)
    n = float(table.sum())
    out = {"n": int(n), "n_rows": int(len(ra)), "n_cols": int(len(rb)),
           "table": {str(x): {str(y): int(table[i, j]) for j, y in enumerate(rb)} for i, x in enumerate(ra)}}
    r, k = table.shape
    if n == 0 or r < 2 or k < 2:
        return {**out, "v": None, "v_corrected": None, "chi2": None, "dof": 0,
                "note": "fewer than two values on one side: association undefined"}
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / n
    chi2 = float((((table - expected) ** 2) / np.where(expected > 0, expected, 1)).sum())
    v = math.sqrt(chi2 / (n * (min(r, k) - 1)))
    phi2c = max(0.0, chi2 / n - (k - 1) * (r - 1) / (n - 1)) if n > 1 else 0.0
    rc, kc = r - (r - 1) ** 2 / (n - 1), k - (k - 1) ** 2 / (n - 1)
    vc = math.sqrt(phi2c / min(kc - 1, rc - 1)) if min(kc, rc) > 1 else None
    return {**out, "v": v, "v_corrected": vc, "chi2": chi2, "dof": int((r - 1) * (k - 1))}


def confounding_summary(manifest, attributes: Sequence[str] = ("site", "source")) -> dict:
    """{attr: {"cramers_v", "v_corrected", "n", "n_values", "single_label_values", "counts", "strength"},
    "warnings": [...]} over the labelled rows."""
    df = manifest[manifest["label"].isin(LABELS)] if "label" in manifest else manifest.iloc[0:0]
    out: dict = {"warnings": [], "strong_threshold": STRONG_V, "n_labelled": int(len(df))}
    for attr in attributes:
        if attr not in df or not len(df):
            continue
        values = df[attr].fillna("").astype(str).replace("", "unknown")
        cv = cramers_v(values, df["label"].astype(str))
        per_value = cv["table"]
        single = sorted(k for k, row in per_value.items() if sum(1 for c in row.values() if c) == 1)
        v = cv["v"]
        strength = ("undefined" if v is None else "strong" if v >= STRONG_V else
                    "moderate" if v >= MODERATE_V else "weak")
        out[attr] = {"cramers_v": v, "v_corrected": cv["v_corrected"], "chi2": cv["chi2"], "dof": cv["dof"],
                     "n": cv["n"], "n_values": cv["n_rows"], "n_single_label_values": len(single),
                     "n_images_in_single_label_values": int(sum(sum(per_value[k].values()) for k in single)),
                     "strength": strength, "counts": per_value}
        if v is not None and v >= STRONG_V:
            out["warnings"].append(
                f"{attr} is strongly associated with the label (Cramér's V {v:.2f}, n={cv['n']}; "
                f"{len(single)} of {cv['n_rows']} {attr} values hold a single label): a model can learn the "
                f"{attr} instead of the disease — run the shortcut battery and validate on another {attr}")
    return out
