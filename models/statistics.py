"""Small-sample statistics for the release gate: intervals that stay honest when n is small or the
model separates the classes perfectly, calibration of P(covid19), and the prior-shift correction.

Everything here is pure numpy/scipy (no project imports), so the model library,
the release policy and reports can share one definition of each number.

Methods, and why
----------------
Proportions (sensitivity, specificity, PPV, NPV) — ``clustered_proportion``:
    exact Clopper–Pearson interval on the *effective* count after a Kish design effect for
    patient clustering: ``deff = 1 + (m_w - 1) * rho``, ``m_w = sum(m_i^2) / n`` (size-weighted
    mean images per patient), ``rho`` the one-way ANOVA intra-class correlation of the per-image
    0/1 outcome within patients, clipped to [0, 1]. ``n_eff = n / deff``, ``x_eff = p_hat * n_eff``
    (Clopper–Pearson through the beta quantiles accepts non-integer counts). When ``rho`` cannot be
    estimated (every image has the same outcome, so there is no variance to decompose) ``rho = 1``
    is used, the conservative choice: ``n_eff`` = the number of patients when clusters have equal
    size. Why a design effect and not patient aggregation: the point estimate stays the image-level
    proportion the rest of the system reports (thresholds act on images), while the interval width
    reflects the independent information (patients). Why Clopper–Pearson and not Wilson: it never
    undercovers; at the release gate a too-narrow interval is the costly error. 5/5 correct gives
    [0.478, 1.0].

AUROC — ``auroc_interval``:
    Newcombe's (2006) score-type interval for the Mann–Whitney AUC ("Method 5", Stat Med
    25:559-573): the bounds are the values A with ``(A_hat - A)^2 = z^2 Var(A)``, ``Var`` the
    Hanley–McNeil variance with the exponential approximation evaluated *at the bound*, not at
    ``A_hat``. Like Wilson's interval for a proportion it does not collapse to a point at
    ``A_hat = 1`` (5 vs 5 perfectly separated: [0.65, 1.0]), where DeLong's variance and every
    bootstrap of a perfectly separating score are zero. Clustering: ``n1``/``n0`` are the numbers of
    distinct positive / negative *patients*, not images (design effect with rho = 1, conservative).

Calibration of P(covid19) — ``binary_calibration``:
    binary ECE (equal-width bins) with a patient-level percentile bootstrap interval; logistic
    calibration slope (``logit P(y) = a + b * logit(p)``, b) with a Wald interval, and
    calibration-in-the-large intercept (``a`` with ``b`` fixed at 1). Slope/intercept are ``None``
    with a note when the outcome is perfectly separated by ``logit(p)`` (not estimable).

Prior shift — ``prior_shift``:
    the Bayes odds correction ``odds' = odds * [pi_s / (1 - pi_s)] / [pi_d / (1 - pi_d)]`` from the
    development prevalence ``pi_d`` (what the calibrated model assumes) to a site's ``pi_s``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

CONFIDENCE = 0.95
PROPORTION_METHOD = ("Clopper-Pearson exact interval on design-effect-adjusted counts "
                     "(Kish deff = 1 + (m_w - 1) * ICC of the outcome within patients; ICC = 1 when "
                     "not estimable)")
AUROC_METHOD = ("Newcombe (2006) score-type interval (Method 5, Hanley-McNeil variance at the bound), "
                "n = distinct positive/negative patients")
ECE_METHOD = "binary ECE of P(covid19), 10 equal-width bins, patient-level percentile bootstrap interval"


def _z(confidence: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + confidence / 2))


def cluster_codes(clusters: Sequence[Any] | np.ndarray) -> tuple[int, np.ndarray]:
    """(number of clusters, code per row), codes numbered in order of FIRST APPEARANCE.

    For patient-bootstrap resampling: the i-th draw of a seeded RNG must pick the same patient
    whatever that patient's id. ``np.unique`` numbers ids in sorted order, and patient ids are keyed
    pseudonyms (install-specific): the same data and seed would give another interval on another
    install. First appearance follows the rows' order (the manifest keeps the source's order).
    """
    ids = np.asarray([str(c) for c in clusters], dtype=object)
    if not len(ids):
        return 0, np.zeros(0, dtype=int)
    _, first, inv = np.unique(ids, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=int)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return int(len(first)), rank[inv.reshape(-1)]


# ------------------------------------------------------------------------------- proportions
def clopper_pearson(x: float, n: float, confidence: float = CONFIDENCE) -> tuple[float | None, float | None]:
    """Exact (Clopper–Pearson) interval for ``x`` successes in ``n`` trials; accepts non-integer
    (effective) counts. ``(None, None)`` when ``n <= 0``."""
    from scipy.stats import beta

    if n is None or n <= 0:
        return None, None
    x = min(max(float(x), 0.0), float(n))
    a = 1 - confidence
    lo = 0.0 if x <= 0 else float(beta.ppf(a / 2, x, n - x + 1))
    hi = 1.0 if x >= n else float(beta.ppf(1 - a / 2, x + 1, n - x))
    return lo, hi


def wilson(x: float, n: float, confidence: float = CONFIDENCE) -> tuple[float | None, float | None]:
    """Wilson score interval (reported beside Clopper–Pearson for reference only)."""
    if n is None or n <= 0:
        return None, None
    z = _z(confidence)
    p = x / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, c - h), min(1.0, c + h)


def icc_binary(outcome: np.ndarray, clusters: np.ndarray) -> float | None:
    """One-way ANOVA intra-class correlation of a 0/1 outcome; None when not estimable."""
    y = np.asarray(outcome, dtype=float)
    _, inv = np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)
    m = np.bincount(inv).astype(float)
    s = np.bincount(inv, weights=y)
    n, k = float(len(y)), len(m)
    if k < 2 or n - k < 1:
        return None
    p = s.sum() / n
    pi = s / m
    msb = float((m * (pi - p) ** 2).sum() / (k - 1))
    msw = float((m * pi * (1 - pi)).sum() / (n - k))
    m0 = (n - (m ** 2).sum() / n) / (k - 1)
    den = msb + (m0 - 1) * msw
    if den <= 0:
        return None
    return float((msb - msw) / den)


def design_effect(outcome: np.ndarray, clusters: np.ndarray) -> tuple[float, float | None, str]:
    """(deff, rho used, note). ``deff = 1 + (m_w - 1) * rho``; rho clipped to [0, 1]; rho = 1 when
    it cannot be estimated and some patient has several images."""
    y = np.asarray(outcome, dtype=float)
    if len(y) == 0:
        return 1.0, None, ""
    _, inv = np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)
    m = np.bincount(inv).astype(float)
    m_w = float((m ** 2).sum() / m.sum())
    if m_w <= 1.0 + 1e-12:
        return 1.0, None, "one image per patient: no clustering"
    rho = icc_binary(y, clusters)
    note = ""
    if rho is None:
        rho, note = 1.0, "ICC not estimable (no within/between variance): rho = 1 (conservative)"
    rho = min(max(rho, 0.0), 1.0)
    return 1.0 + (m_w - 1.0) * rho, rho, note


def clustered_proportion(outcome: Sequence[bool] | np.ndarray, clusters: Sequence[str] | np.ndarray,
                         confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Proportion of ``outcome`` with a Clopper–Pearson interval on design-effect-adjusted counts.

    Returns ``{"value", "ci_low", "ci_high", "x", "n", "n_patients", "design_effect", "icc",
    "n_effective", "method", "note"}``; ``value``/bounds are None when ``n = 0``.
    """
    y = np.asarray(outcome, dtype=bool)
    cl = np.asarray(clusters, dtype=object)
    n = int(len(y))
    out: dict[str, Any] = {"value": None, "ci_low": None, "ci_high": None, "x": int(y.sum()), "n": n,
                           "n_patients": int(len(set(cl.tolist()))) if n else 0, "design_effect": None,
                           "icc": None, "n_effective": None, "method": "clopper-pearson+design-effect",
                           "note": ""}
    if n == 0:
        out["note"] = "no case in the denominator"
        return out
    p = float(y.mean())
    deff, rho, note = design_effect(y, cl)
    n_eff = n / deff
    lo, hi = clopper_pearson(p * n_eff, n_eff, confidence)
    out.update(value=p, ci_low=lo, ci_high=hi, design_effect=round(deff, 4), icc=None if rho is None else round(rho, 4),
               n_effective=round(n_eff, 3), note=note)
    return out


# ------------------------------------------------------------------------------- AUROC
def _newcombe_var(a: float, n1: float, n0: float) -> float:
    big_n = (n1 + n0) / 2.0
    return a * (1 - a) / (n1 * n0) * (2 * big_n - 1 - (3 * big_n - 3) / ((2 - a) * (1 + a)))


def auroc_interval(auc: float | None, n_pos: int, n_neg: int,
                   confidence: float = CONFIDENCE) -> tuple[float | None, float | None]:
    """Newcombe's Method 5 score interval for an AUROC estimate with ``n_pos`` positive and
    ``n_neg`` negative independent units. Never a point unless n is infinite."""
    from scipy.optimize import brentq

    if auc is None or n_pos < 1 or n_neg < 1 or not math.isfinite(auc):
        return None, None
    z2 = _z(confidence) ** 2

    def f(a: float) -> float:
        return (auc - a) ** 2 - z2 * _newcombe_var(a, n_pos, n_neg)

    d = 1e-9
    lo = 0.0 if auc <= 0 else float(brentq(f, 0.0, max(auc - d, 0.0) if auc >= 1 else auc))
    hi = 1.0 if auc >= 1 else float(brentq(f, min(auc + d, 1.0) if auc <= 0 else auc, 1.0))
    return lo, hi


# ------------------------------------------------------------------------------- calibration
def binary_ece(p: np.ndarray, y: np.ndarray, n_bins: int = 10, w: np.ndarray | None = None) -> float | None:
    """(Weighted) ECE of P(covid19) against the covid19 indicator, equal-width bins."""
    p = np.asarray(p, dtype=float)
    y = np.asarray(y, dtype=float)
    w = np.ones(len(p)) if w is None else np.asarray(w, dtype=float)
    tot = w.sum()
    if len(p) == 0 or tot <= 0:
        return None
    idx = np.clip(np.digitize(p, np.linspace(0, 1, n_bins + 1)[1:-1], right=True), 0, n_bins - 1)
    wb = np.bincount(idx, weights=w, minlength=n_bins)
    py = np.bincount(idx, weights=w * y, minlength=n_bins)
    pp = np.bincount(idx, weights=w * p, minlength=n_bins)
    m = wb > 0
    return float((np.abs(py[m] - pp[m])).sum() / tot)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _logistic_fit(x: np.ndarray, y: np.ndarray, offset: np.ndarray, with_slope: bool,
                  max_iter: int = 100) -> tuple[np.ndarray, np.ndarray] | None:
    """Newton–Raphson logistic regression ``y ~ a (+ b x) + offset``; None on separation/divergence."""
    X = np.column_stack([np.ones(len(y)), x]) if with_slope else np.ones((len(y), 1))
    beta = np.zeros(X.shape[1])
    for _ in range(max_iter):
        eta = X @ beta + offset
        mu = 1 / (1 + np.exp(-eta))
        wv = mu * (1 - mu)
        info = X.T @ (X * wv[:, None])
        try:
            step = np.linalg.solve(info + 1e-12 * np.eye(len(beta)), X.T @ (y - mu))
        except np.linalg.LinAlgError:
            return None
        beta = beta + step
        if np.abs(beta).max() > 50:
            return None
        if np.abs(step).max() < 1e-9:
            break
    else:
        return None
    eta = X @ beta + offset
    mu = 1 / (1 + np.exp(-eta))
    info = X.T @ (X * (mu * (1 - mu))[:, None])
    try:
        cov = np.linalg.inv(info)
    except np.linalg.LinAlgError:
        return None
    return beta, cov


def _separated(x: np.ndarray, y: np.ndarray) -> bool:
    pos, neg = x[y > 0.5], x[y < 0.5]
    return len(pos) == 0 or len(neg) == 0 or pos.min() > neg.max() or pos.max() < neg.min()


def calibration_slope_intercept(p: np.ndarray, y: np.ndarray, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Logistic calibration slope (b in ``logit P(y) = a + b logit(p)``) and calibration-in-the-large
    intercept (``a`` with b fixed at 1), each ``{"value", "ci_low", "ci_high"}`` (Wald, image-level)."""
    y = np.asarray(y, dtype=float)
    x = _logit(p)
    none = {"value": None, "ci_low": None, "ci_high": None}
    out: dict[str, Any] = {"slope": dict(none), "intercept": dict(none), "note": ""}
    if len(y) < 2 or y.min() == y.max():
        out["note"] = "one outcome class only: calibration slope and intercept not estimable"
        return out
    z = _z(confidence)
    fit1 = _logistic_fit(x, y, x, with_slope=False)
    if fit1 is not None:
        a, cov = fit1
        se = math.sqrt(max(cov[0, 0], 0.0))
        out["intercept"] = {"value": float(a[0]), "ci_low": float(a[0] - z * se), "ci_high": float(a[0] + z * se)}
    if _separated(x, y):
        out["note"] = "P(covid19) separates the outcome perfectly: calibration slope not estimable (infinite)"
        return out
    fit2 = _logistic_fit(x, y, np.zeros(len(y)), with_slope=True)
    if fit2 is None:
        out["note"] = "calibration slope fit did not converge (quasi-separation): not estimable"
        return out
    b, cov = fit2
    se = math.sqrt(max(cov[1, 1], 0.0))
    out["slope"] = {"value": float(b[1]), "ci_low": float(b[1] - z * se), "ci_high": float(b[1] + z * se)}
    return out


def binary_calibration(p: np.ndarray, y: np.ndarray, patients: Sequence[str] | np.ndarray, *, n_bins: int = 10,
                       n_bootstrap: int = 1000, seed: int = 0, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Calibration of P(covid19): ECE with a patient-bootstrap interval, slope and intercept."""
    p = np.asarray(p, dtype=float)
    y = np.asarray(y, dtype=float)
    patients = np.asarray(patients, dtype=object)
    ece = binary_ece(p, y, n_bins)
    lo = hi = None
    if ece is not None and n_bootstrap >= 10:
        rng = np.random.default_rng(seed + 7)
        n_patients, inv = cluster_codes(patients)
        vals = []
        for _ in range(n_bootstrap):
            cnt = np.bincount(rng.integers(0, n_patients, n_patients), minlength=n_patients).astype(float)
            v = binary_ece(p, y, n_bins, cnt[inv])
            if v is not None:
                vals.append(v)
        if len(vals) >= 10:
            a = (1 - confidence) / 2
            lo, hi = float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))
    si = calibration_slope_intercept(p, y, confidence)
    return {"ece": {"value": ece, "ci_low": lo, "ci_high": hi}, "n_bins": n_bins,
            "slope": si["slope"], "intercept": si["intercept"], "note": si["note"],
            "mean_predicted": float(p.mean()) if len(p) else None,
            "observed_rate": float(y.mean()) if len(y) else None, "method": ECE_METHOD,
            "slope_method": "logistic recalibration, Wald interval; intercept = calibration-in-the-large (slope fixed 1)"}


def reliability_bins(p: np.ndarray, y: np.ndarray, n_bins: int = 10) -> list[dict[str, float]]:
    """Per non-empty bin: mean predicted P(covid19), observed rate, count (for reliability plots)."""
    p = np.asarray(p, dtype=float)
    y = np.asarray(y, dtype=float)
    idx = np.clip(np.digitize(p, np.linspace(0, 1, n_bins + 1)[1:-1], right=True), 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        m = idx == b
        if m.any():
            out.append({"predicted": float(p[m].mean()), "observed": float(y[m].mean()), "n": int(m.sum())})
    return out


# ------------------------------------------------------------------------------- prevalence
def prior_shift(p: float | np.ndarray, from_prevalence: float, to_prevalence: float) -> float | np.ndarray:
    """Correct a calibrated P(covid19) for a change of prevalence (Bayes odds correction).

    ``p`` was calibrated at the development prevalence ``from_prevalence``; the returned value is
    the probability at ``to_prevalence`` (a site's deployment prevalence), assuming the image and
    vitals distributions within each class are unchanged (label shift).
    """
    for name, v in (("from_prevalence", from_prevalence), ("to_prevalence", to_prevalence)):
        if not (isinstance(v, (int, float)) and 0 < float(v) < 1):
            raise ValueError(f"{name} must be a prevalence strictly between 0 and 1, got {v!r}")
    arr = np.clip(np.asarray(p, dtype=float), 0.0, 1.0)
    ratio = (to_prevalence / (1 - to_prevalence)) / (from_prevalence / (1 - from_prevalence))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(arr >= 1.0, 1.0, np.where(arr <= 0.0, 0.0, (arr * ratio) / (arr * ratio + (1 - arr))))
    return float(out) if np.ndim(p) == 0 else out


def prior_logit_offset(development_prior: Sequence[float], training_prior: Sequence[float]) -> list[float]:
    """Per-class logit offset ``log(pi_dev) - log(pi_train_effective)`` that moves a network trained
    with class weighting (whose effective prior is ``training_prior``) back to the development
    prevalence, before temperature scaling. Classes absent from either get 0."""
    dev = np.asarray(development_prior, dtype=float)
    eff = np.asarray(training_prior, dtype=float)
    out = np.zeros(len(dev))
    m = (dev > 0) & (eff > 0)
    out[m] = np.log(dev[m] / dev[m].sum()) - np.log(eff[m] / eff[m].sum())
    out[m] -= out[m].mean()
    return [float(v) for v in out]
