"""AUROC with DeLong intervals, and the PAIRED difference of two AUROCs on the same cases (DeLong 1988).

Clustered by patient (Obuchowski 1997): a patient's images are not independent, so the structural
components (placement values) are summed per patient before their variance is taken. With one image
per patient this is DeLong's estimator (with the K/(K-1) small-sample factor).

- ``auroc_ci(y, score, clusters=None, level=0.95) -> dict``: ``{"value", "ci_low", "ci_high", "se",
  "method", "n_positive", "n_negative", "n_clusters", "floored"}``; Wald interval on the AUROC
  scale, clipped to [0, 1].
- ``paired_auroc_difference(y, score_a, score_b, clusters=None) -> dict``: AUROC(a) - AUROC(b) with
  ``{"value", "ci_low", "ci_high", "se", "p_value", "auroc_a", "auroc_b", ...}`` — the covariance
  of the two AUROCs (same cases) is part of the variance, which is what makes it a paired test.

Floor for perfect separation: when every positive outranks every negative (AUROC 0 or 1), the
DeLong variance is 0 and the interval would collapse to a point, claiming certainty from a finite
sample. The variance is therefore floored at the Hanley–McNeil (1982) variance evaluated at the
AUROC pulled in by half a mis-ranked case of the smaller class: ``A* = clip(A, 1/(2 m), 1 - 1/(2 m))``,
``m = min(n_positive, n_negative)``. For a difference, the floor is the larger of the two AUROCs'
floors when both are at the boundary (two perfect models: the difference is 0 ± that floor), else 0.
The same floor applies whenever the DeLong variance is degenerate (≤ 1e-12), e.g. every score tied
(AUROC exactly 0.5 with a zero-width interval would otherwise pass any "near chance" criterion).
``floored`` says whether it applied. The interval is None when a class is absent.
"""
from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054
DEGENERATE_VAR = 1e-12


def _z(level: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + level / 2) if level != 0.95 else Z95


def _placements(y: np.ndarray, score: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(AUROC, V10 per positive, V01 per negative): Mann–Whitney kernel with ties counted 1/2."""
    pos, neg = score[y], score[~y]
    # V10_i = P(neg < pos_i) + 0.5 P(neg == pos_i); via sorted negatives (O(n log n))
    neg_sorted = np.sort(neg)
    pos_sorted = np.sort(pos)
    lt = np.searchsorted(neg_sorted, pos, side="left")
    le = np.searchsorted(neg_sorted, pos, side="right")
    v10 = (lt + 0.5 * (le - lt)) / len(neg)
    gt = len(pos) - np.searchsorted(pos_sorted, neg, side="right")
    ge = len(pos) - np.searchsorted(pos_sorted, neg, side="left")
    v01 = (gt + 0.5 * (ge - gt)) / len(pos)
    return float(v10.mean()), v10, v01


def _cluster_sums(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    return np.bincount(groups, weights=values, minlength=n_groups)


def _components(y, scores: list[np.ndarray], clusters):
    y = np.asarray(y, dtype=bool)
    if y.all() or not y.any():
        scores = []  # one class absent: the caller reports it undefined
    if clusters is None:
        clusters = np.arange(len(y))
    _, g = np.unique(np.asarray([str(c) for c in clusters], dtype=object), return_inverse=True)
    k = int(g.max()) + 1 if len(g) else 0
    m_k = np.bincount(g[y], minlength=k).astype(float)
    n_k = np.bincount(g[~y], minlength=k).astype(float)
    out = []
    for s in scores:
        a, v10, v01 = _placements(y, np.asarray(s, dtype=float))
        out.append((a, _cluster_sums(v10, g[y], k), _cluster_sums(v01, g[~y], k)))
    return y, k, m_k, n_k, out


def _covariance(k, m_k, n_k, comp_a, comp_b) -> float:
    """Obuchowski's clustered covariance of two AUROCs on the same cases (variance when a == b)."""
    a1, v10a, v01a = comp_a
    a2, v10b, v01b = comp_b
    m, n = m_k.sum(), n_k.sum()
    da10, db10 = v10a - m_k * a1, v10b - m_k * a2
    da01, db01 = v01a - n_k * a1, v01b - n_k * a2
    f = k / (k - 1)
    s10 = f * (da10 * db10).sum() / m
    s01 = f * (da01 * db01).sum() / n
    s11 = f * ((da10 * db01).sum() + (db10 * da01).sum()) / 2
    return float(s10 / m + s01 / n + 2 * s11 / (m * n))


def hanley_mcneil_variance(a: float, n_pos: int, n_neg: int) -> float:
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    return float((a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg))


def variance_floor(a: float, n_pos: int, n_neg: int) -> float:
    """Hanley–McNeil variance at the AUROC pulled half a case of the smaller class off the boundary."""
    eps = 1.0 / (2 * min(n_pos, n_neg))
    return hanley_mcneil_variance(min(max(a, eps), 1 - eps), n_pos, n_neg)


def _undefined(y, k, note) -> dict:
    return {"value": None, "ci_low": None, "ci_high": None, "se": None, "method": "delong-clustered",
            "n_positive": int(np.sum(y)), "n_negative": int(len(y) - np.sum(y)), "n_clusters": int(k),
            "floored": False, "note": note}


def auroc_ci(y, score, clusters=None, level: float = 0.95) -> dict:
    """AUROC (positives = ``y`` True) with a clustered DeLong Wald interval."""
    y, k, m_k, n_k, comps = _components(y, [score], clusters)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return _undefined(y, k, "one class absent: AUROC undefined")
    if k < 2:
        return _undefined(y, k, "a single patient: no variance estimate")
    a = comps[0][0]
    var = _covariance(k, m_k, n_k, comps[0], comps[0])
    floor = variance_floor(a, n_pos, n_neg) if (a <= 0 or a >= 1 or var <= DEGENERATE_VAR) else 0.0
    floored = var < floor
    se = math.sqrt(max(var, floor, 0.0))
    z = _z(level)
    return {"value": a, "ci_low": max(0.0, a - z * se), "ci_high": min(1.0, a + z * se), "se": se,
            "method": "delong-clustered", "level": level, "n_positive": n_pos, "n_negative": n_neg,
            "n_clusters": int(k), "floored": bool(floored)}


def paired_auroc_difference(y, score_a, score_b, clusters=None, level: float = 0.95) -> dict:
    """AUROC(score_a) - AUROC(score_b) on the same cases, clustered DeLong interval and two-sided p."""
    y, k, m_k, n_k, comps = _components(y, [score_a, score_b], clusters)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return _undefined(y, k, "one class absent: AUROC difference undefined")
    if k < 2:
        return _undefined(y, k, "a single patient: no variance estimate")
    (a1, *_), (a2, *_) = comps
    var = (_covariance(k, m_k, n_k, comps[0], comps[0]) + _covariance(k, m_k, n_k, comps[1], comps[1])
           - 2 * _covariance(k, m_k, n_k, comps[0], comps[1]))
    at_edge = [a for a in (a1, a2) if a <= 0 or a >= 1]
    floor = (max(variance_floor(a, n_pos, n_neg) for a in (a1, a2))
             if len(at_edge) == 2 or var <= DEGENERATE_VAR else 0.0)
    floored = var < floor
    se = math.sqrt(max(var, floor, 0.0))
    d = a1 - a2
    z = _z(level)
    from statistics import NormalDist

    p = 2 * (1 - NormalDist().cdf(abs(d) / se)) if se > 0 else (1.0 if d == 0 else 0.0)
    return {"value": d, "ci_low": max(-1.0, d - z * se), "ci_high": min(1.0, d + z * se), "se": se,
            "p_value": p, "auroc_a": a1, "auroc_b": a2, "method": "delong-paired-clustered", "level": level,
            "n_positive": n_pos, "n_negative": n_neg, "n_clusters": int(k), "floored": bool(floored)}
