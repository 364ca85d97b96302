"""Clinical evaluation: covid19-vs-rest metrics with patient-level bootstrap CIs, calibration, subgroups.

Public API
----------
- ``evaluate_predictions(labels, logits, *, temperature, threshold, patient_ids, meta=None, ...) -> dict``:
  the numbers (``evaluation.json`` schema below) from logits; no model or MLflow needed.
- ``fit_temperature(logits, labels) -> float``, ``choose_threshold(p_covid, is_covid, target) -> dict``,
  ``expected_calibration_error(probs, labels) -> float``.
- ``write_plots(evaluation, out_dir, curves) -> list[Path]``: ``roc.png``, ``reliability.png``, ``confusion.png``.
- (``models.validation``) ``evaluate_model_version(model_version="champion", dataset_name=..., split=None, out=None, ...) -> dict``:
  what ``cxr evaluate`` runs: a registered version on a dataset. If the dataset is the one the
  version was trained on, its ``test`` split; otherwise (external validation) every labelled row.
  Logs ``evaluation/external/<dataset>.json`` (+ plots) on the version's run and audits ``model.evaluated``.

``evaluation.json`` (keys always present; a metric that cannot be computed is ``null`` with a note in
``warnings``)::

    {"covid19_vs_rest": {"auroc"|"sensitivity"|"specificity"|"ppv"|"npv": {"value", "ci_low", "ci_high"},
                         "threshold": float, "threshold_selection": {...}, "counts": {"tp","fp","tn","fn"},
                         "prevalence": float},
     "per_class_auroc": {cls: float|null}, "confusion_matrix": {"labels": [...], "matrix": [[...]]},
     "calibration": {"temperature", "ece_before", "ece_after", "ece_covid19_before", "ece_covid19_after",
                     "n_bins"},
     "subgroups": {attr: {value: {"n_images", "n_patients", "n_covid19", "auroc", "sensitivity",
                                   "specificity", "small": bool, "note"}}},
     "n_patients", "n_images", "class_counts", "bootstrap": {"n", "unit": "patient", "seed"},
     "dataset", "dataset_version", "split", "model_version", "external": {...}, "warnings": [...]}
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.network import CLASSES
from models.statistics import (
    AUROC_METHOD,
    ECE_METHOD,
    PROPORTION_METHOD,
    auroc_interval,
    binary_calibration,
    cluster_codes,
    clustered_proportion,
    reliability_bins,
)

SUBGROUP_ATTRIBUTES = ("sex", "age_band", "view", "site", "source", "variant", "label_source")
SMALL_GROUP = 30
AGE_BANDS = ((0, 18, "<18"), (18, 40, "18-39"), (40, 60, "40-59"), (60, 80, "60-79"), (80, 200, "80+"))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int = 200) -> float:
    """Temperature minimising the NLL of ``softmax(logits / T)`` (LBFGS on log T, T in [0.05, 20])."""
    import torch

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) < 2:
        return 1.0
    lg = torch.tensor(logits)
    y = torch.tensor(labels)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lg / log_t.exp(), y)
        loss.backward()
        return loss

    try:
        opt.step(closure)
        t = float(log_t.exp().item())
    except RuntimeError:
        return 1.0
    if not math.isfinite(t):
        return 1.0
    return float(min(max(t, 0.05), 20.0))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float | None:
    """Top-label ECE (multi-class): sum over confidence bins of |accuracy - confidence| * fraction."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if len(labels) == 0:
        return None
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(float)
    return _ece(conf, correct, n_bins)


def _ece(conf: np.ndarray, outcome: np.ndarray, n_bins: int) -> float:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(outcome[m].mean() - conf[m].mean())
    return float(ece)


def binary_ece(p: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float | None:
    """ECE of P(covid19) against the covid19 indicator."""
    if len(y) == 0:
        return None
    return _ece(np.asarray(p, float), np.asarray(y, float), n_bins)


def choose_threshold(p_covid: np.ndarray, is_covid: np.ndarray, target_sensitivity: float = 0.90) -> dict:
    """Largest threshold on P(covid19) whose sensitivity on these (validation) cases is ≥ target."""
    p_covid = np.asarray(p_covid, dtype=np.float64)
    is_covid = np.asarray(is_covid, dtype=bool)
    pos = np.sort(p_covid[is_covid])[::-1]
    if len(pos) == 0:
        return {"threshold": 0.5, "target_sensitivity": target_sensitivity, "achieved_sensitivity": None,
                "chosen_on": "validation", "n_positive": 0,
                "note": "no covid19 case in the validation split: default threshold 0.5 used"}
    k = max(1, math.ceil(target_sensitivity * len(pos) - 1e-9))
    thr = float(pos[k - 1])
    achieved = float((p_covid[is_covid] >= thr).mean())
    spec = float((p_covid[~is_covid] < thr).mean()) if (~is_covid).any() else None
    return {"threshold": thr, "target_sensitivity": target_sensitivity, "achieved_sensitivity": achieved,
            "specificity_at_threshold": spec, "chosen_on": "validation", "n_positive": int(len(pos))}


# ------------------------------------------------------------------------------- point metrics
def _auroc(y: np.ndarray, score: np.ndarray, w: np.ndarray | None = None) -> float | None:
    """(Weighted) AUROC = P(score_pos > score_neg) + 0.5 P(tie); None when a class is absent."""
    y = np.asarray(y, dtype=bool)
    w = np.ones(len(y)) if w is None else np.asarray(w, dtype=float)
    uniq, inv = np.unique(np.asarray(score, dtype=float), return_inverse=True)
    wpos = np.bincount(inv, weights=w * y, minlength=len(uniq))
    wneg = np.bincount(inv, weights=w * ~y, minlength=len(uniq))
    tp, tn = wpos.sum(), wneg.sum()
    if tp <= 0 or tn <= 0:
        return None
    below = np.cumsum(wneg) - wneg
    return float((wpos * (below + 0.5 * wneg)).sum() / (tp * tn))


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def _binary_metrics(y: np.ndarray, p: np.ndarray, thr: float, w: np.ndarray | None = None) -> dict:
    w = np.ones(len(y)) if w is None else w
    pred = p >= thr
    tp = float(w[pred & y].sum())
    fp = float(w[pred & ~y].sum())
    tn = float(w[~pred & ~y].sum())
    fn = float(w[~pred & y].sum())
    return {"auroc": _auroc(y, p, w), "sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp),
            "ppv": _ratio(tp, tp + fp), "npv": _ratio(tn, tn + fn)}


def _bootstrap(y: np.ndarray, p: np.ndarray, thr: float, patients: np.ndarray, n_boot: int,
               seed: int) -> dict[str, list[float]]:
    """Resample patients with replacement; each image is weighted by its patient's draw count."""
    rng = np.random.default_rng(seed)
    n_patients, inv = cluster_codes(patients)  # first-appearance order: not the pseudonyms' sort order
    samples: dict[str, list[float]] = {k: [] for k in ("auroc", "sensitivity", "specificity", "ppv", "npv")}
    for _ in range(n_boot):
        counts = np.bincount(rng.integers(0, n_patients, n_patients), minlength=n_patients).astype(float)
        m = _binary_metrics(y, p, thr, counts[inv])
        for k, v in m.items():
            samples[k].append(np.nan if v is None else v)
    return samples


def _with_ci(value: float | None, samples: Sequence[float]) -> dict:
    arr = np.asarray(samples, dtype=float)
    arr = arr[np.isfinite(arr)]
    if value is None or len(arr) < 10:
        return {"value": value, "ci_low": None, "ci_high": None, "n_bootstrap_valid": int(len(arr))}
    return {"value": float(value), "ci_low": float(np.percentile(arr, 2.5)),
            "ci_high": float(np.percentile(arr, 97.5)), "n_bootstrap_valid": int(len(arr))}


INTERVAL_METHOD_SHORT = ("95% CI: proportions Clopper-Pearson exact with patient design effect; "
                         "AUROC Newcombe score interval on patient counts")


def interval_methods() -> dict[str, Any]:
    """What ``ci_low``/``ci_high`` mean, named in evaluation.json, the PDF report and the model card."""
    return {"confidence": 0.95, "proportions": PROPORTION_METHOD, "auroc": AUROC_METHOD,
            "calibration_ece": ECE_METHOD, "cluster_unit": "patient",
            "reference": "models/statistics.py; Clopper & Pearson 1934; Kish 1965; Newcombe 2006 (Stat Med 25:559)"}


def small_sample_intervals(y: np.ndarray, p: np.ndarray, thr: float, patients: np.ndarray, point: dict,
                           boot: dict) -> dict[str, Any]:
    """Per metric ``{"value", "ci_low", "ci_high", "method", "bootstrap_ci_low", "bootstrap_ci_high", ...}``:
    exact/score intervals that stay honest at small n (models/statistics.py); the percentile patient
    bootstrap is kept beside them for comparison."""
    pred = p >= thr
    parts = {"sensitivity": (pred[y], patients[y]), "specificity": (~pred[~y], patients[~y]),
             "ppv": (y[pred], patients[pred]), "npv": (~y[~pred], patients[~pred])}
    out: dict[str, Any] = {}
    for k, (outcome, cl) in parts.items():
        m = clustered_proportion(outcome, cl)
        m["value"] = point[k]
        b = _with_ci(point[k], boot[k])
        m.update(bootstrap_ci_low=b["ci_low"], bootstrap_ci_high=b["ci_high"],
                 n_bootstrap_valid=b["n_bootstrap_valid"])
        out[k] = m
    n_pos, n_neg = len(set(patients[y].tolist())), len(set(patients[~y].tolist()))
    lo, hi = auroc_interval(point["auroc"], n_pos, n_neg)
    b = _with_ci(point["auroc"], boot["auroc"])
    out["auroc"] = {"value": point["auroc"], "ci_low": lo, "ci_high": hi, "method": "newcombe-score",
                    "n_pos_patients": n_pos, "n_neg_patients": n_neg, "bootstrap_ci_low": b["ci_low"],
                    "bootstrap_ci_high": b["ci_high"], "n_bootstrap_valid": b["n_bootstrap_valid"]}
    return out


def patient_class_counts(y: np.ndarray, patients: np.ndarray) -> dict[str, int]:
    """Distinct patients with a covid19 image / with a non-covid19 image (the policy's minimums)."""
    return {"n_patients_covid19": int(len(set(patients[y].tolist()))),
            "n_patients_not_covid19": int(len(set(patients[~y].tolist())))}


def age_band(age: Any) -> str:
    try:
        a = float(age)
    except (TypeError, ValueError):
        return "unknown"
    if not math.isfinite(a):
        return "unknown"
    for lo, hi, name in AGE_BANDS:
        if lo <= a < hi:
            return name
    return "unknown"


def _subgroups(meta, y: np.ndarray, p: np.ndarray, thr: float, patients: np.ndarray) -> dict:
    out: dict[str, dict] = {}
    if meta is None:
        return out
    for attr in SUBGROUP_ATTRIBUTES:
        if attr == "age_band":
            if "age_years" not in meta:
                continue
            values = np.array([age_band(a) for a in meta["age_years"].tolist()], dtype=object)
        else:
            if attr not in meta:
                continue
            values = np.array(["unknown" if (v is None or (isinstance(v, float) and math.isnan(v)))
                               else (str(v) if str(v) != "" else "none") for v in meta[attr].tolist()], dtype=object)
        groups = {}
        for value in sorted(set(values.tolist())):
            m = values == value
            yy, pp = y[m], p[m]
            bm = _binary_metrics(yy, pp, thr)
            notes = []
            n_img = int(m.sum())
            if n_img < SMALL_GROUP:
                notes.append(f"small group (n={n_img} < {SMALL_GROUP}): interpret with caution")
            if not yy.any():
                notes.append("no covid19 case: sensitivity and AUROC undefined")
            if yy.all():
                notes.append("no non-covid19 case: specificity and AUROC undefined")
            pm, pred_m = patients[m], pp >= thr
            sens_ci = clustered_proportion(pred_m[yy], pm[yy])
            spec_ci = clustered_proportion(~pred_m[~yy], pm[~yy])
            groups[value] = {"n_images": n_img, "n_patients": int(len(np.unique(patients[m]))),
                             "n_covid19": int(yy.sum()), "auroc": bm["auroc"], "sensitivity": bm["sensitivity"],
                             "specificity": bm["specificity"], "small": n_img < SMALL_GROUP,
                             "sensitivity_ci": [sens_ci["ci_low"], sens_ci["ci_high"]],
                             "specificity_ci": [spec_ci["ci_low"], spec_ci["ci_high"]],
                             "note": "; ".join(notes)}
        out[attr] = groups
    return out


def evaluate_predictions(labels: Sequence[int] | np.ndarray, logits: np.ndarray, *, temperature: float,
                         threshold: float, patient_ids: Sequence[str], meta=None, n_bootstrap: int = 1000,
                         seed: int = 0, threshold_selection: dict | None = None,
                         classes: Sequence[str] = CLASSES) -> tuple[dict, dict]:
    """Numbers for ``evaluation.json`` and the curves for the plots (``(evaluation, curves)``).

    ``labels``: class indices into ``classes`` (covid19 = 0); ``logits``: (N, C) uncalibrated;
    probabilities reported are ``softmax(logits / temperature)``; ``meta``: a DataFrame aligned
    with the rows (sex, age_years, view, site, source, variant) for subgroups.
    """
    from sklearn.metrics import confusion_matrix, roc_curve

    y_cls = np.asarray(labels, dtype=int)
    logits = np.asarray(logits, dtype=np.float64).reshape(len(y_cls), len(classes))
    patients = np.asarray([str(p) for p in patient_ids], dtype=object)
    warnings: list[str] = []
    probs_before = softmax(logits, 1.0)
    probs = softmax(logits, temperature)
    p = probs[:, 0]
    y = y_cls == 0
    n = len(y_cls)
    if n == 0:
        warnings.append("no labelled image to evaluate")
    if n and not y.any():
        warnings.append("no covid19 case: AUROC and sensitivity undefined")
    if n and y.all():
        warnings.append("only covid19 cases: AUROC and specificity undefined")

    point = _binary_metrics(y, p, threshold) if n else {k: None for k in ("auroc", "sensitivity", "specificity",
                                                                          "ppv", "npv")}
    boot = _bootstrap(y, p, threshold, patients, n_bootstrap, seed) if n else {k: [] for k in point}
    n_patients = int(len(np.unique(patients))) if n else 0
    if 0 < n_patients < 20:
        warnings.append(f"only {n_patients} patients: confidence intervals are wide")
    pred = p >= threshold
    cvr: dict[str, Any] = small_sample_intervals(y, p, threshold, patients, point, boot) if n else \
        {k: _with_ci(point[k], boot[k]) for k in point}
    cvr["threshold"] = float(threshold)
    cvr["threshold_selection"] = threshold_selection or {}
    cvr["counts"] = {"tp": int((pred & y).sum()), "fp": int((pred & ~y).sum()), "tn": int((~pred & ~y).sum()),
                     "fn": int((~pred & y).sum())}
    cvr["prevalence"] = float(y.mean()) if n else None

    per_class = {}
    for i, c in enumerate(classes):
        per_class[c] = _auroc(y_cls == i, probs[:, i]) if n else None
        if per_class[c] is None and n:
            warnings.append(f"class {c} absent (or the only class): its one-vs-rest AUROC is undefined")
    cm = confusion_matrix(y_cls, probs.argmax(axis=1), labels=list(range(len(classes)))) if n else \
        np.zeros((len(classes), len(classes)), int)

    evaluation = {
        "covid19_vs_rest": cvr,
        "per_class_auroc": per_class,
        "confusion_matrix": {"labels": list(classes), "rows": "true", "columns": "predicted (argmax)",
                             "matrix": cm.tolist()},
        "calibration": {"temperature": float(temperature),
                        "ece_before": expected_calibration_error(probs_before, y_cls),
                        "ece_after": expected_calibration_error(probs, y_cls),
                        "ece_covid19_before": binary_ece(probs_before[:, 0], y),
                        "ece_covid19_after": binary_ece(p, y), "n_bins": 15, "kind": "top-label"},
        "subgroups": _subgroups(meta, y, p, threshold, patients) if n else {},
        "n_patients": n_patients,
        "n_images": int(n),
        "class_counts": {c: int((y_cls == i).sum()) for i, c in enumerate(classes)},
        "bootstrap": {"n": int(n_bootstrap), "unit": "patient", "seed": int(seed), "ci": 0.95,
                      "method": "percentile",
                      "use": "secondary: reported as bootstrap_ci_low/high; ci_low/ci_high (what the release "
                             "policy reads) use the methods in 'intervals'"},
        "intervals": interval_methods(),
        "interval_method": INTERVAL_METHOD_SHORT,
        "warnings": warnings,
    }
    evaluation.update(patient_class_counts(y, patients))
    evaluation["calibration"]["covid19"] = binary_calibration(p, y, patients, n_bootstrap=n_bootstrap, seed=seed) \
        if n else None
    curves: dict[str, Any] = {"probs": probs, "probs_before": probs_before, "labels": y_cls}
    if meta is not None and n and "site" in meta:
        curves["site"] = np.asarray([str(v) if str(v) not in ("", "nan", "None") else "unknown"
                                     for v in meta["site"].tolist()], dtype=object)
    if n and 0 < y.sum() < n:
        fpr, tpr, _ = roc_curve(y, p)
        curves["roc"] = (fpr, tpr)
    return evaluation, curves


def write_plots(evaluation: dict, out_dir: Path, curves: dict) -> list[Path]:
    """ROC curve, reliability diagram and confusion matrix PNGs (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    cvr = evaluation["covid19_vs_rest"]

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if "roc" in curves:
        fpr, tpr = curves["roc"]
        a = cvr["auroc"]
        label = f"AUROC {a['value']:.3f}" + (f" [{a['ci_low']:.3f}, {a['ci_high']:.3f}]" if a["ci_low"] is not None
                                             else "")
        ax.plot(fpr, tpr, lw=2, label=label)
        sens, spec = cvr["sensitivity"]["value"], cvr["specificity"]["value"]
        if sens is not None and spec is not None:
            ax.scatter([1 - spec], [sens], color="red", zorder=3, label=f"threshold {cvr['threshold']:.3f}")
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "ROC undefined\n(one class only)", ha="center", va="center")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="COVID-19 vs rest")
    fig.tight_layout()
    paths.append(out_dir / "roc.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    labels = curves["labels"]
    for name, probs in (("before", curves["probs_before"]), ("after", curves["probs"])):
        if len(labels) == 0:
            break
        conf = probs.max(axis=1)
        correct = probs.argmax(axis=1) == labels
        edges = np.linspace(0, 1, 11)
        idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, 9)
        xs, ys = [], []
        for b in range(10):
            m = idx == b
            if m.any():
                xs.append(conf[m].mean())
                ys.append(correct[m].mean())
        key = "ece_before" if name == "before" else "ece_after"
        ece = evaluation["calibration"][key]
        ax.plot(xs, ys, "o-", label=f"{name} scaling (ECE {ece:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="confidence", ylabel="accuracy",
           title=f"Reliability (T={evaluation['calibration']['temperature']:.2f})", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "reliability.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    paths += _covid19_reliability_plots(evaluation, out_dir, curves, plt)

    cm = np.asarray(evaluation["confusion_matrix"]["matrix"])
    names = evaluation["confusion_matrix"]["labels"]
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    fig.tight_layout()
    paths.append(out_dir / "confusion.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


MAX_SITE_PLOTS = 12


def _covid19_reliability_plots(evaluation: dict, out_dir: Path, curves: dict, plt) -> list[Path]:
    """``reliability_covid19.png`` (all sites, one line per site) and ``reliability_covid19_site-<k>.png``
    per site (the largest ``MAX_SITE_PLOTS`` sites; the rest pooled as ``other-sites``): P(covid19)
    against the observed covid19 rate, with the binary ECE."""
    import re

    labels = curves["labels"]
    if len(labels) == 0:
        return []
    p = curves["probs"][:, 0]
    y = (labels == 0).astype(float)
    sites = curves.get("site")
    if sites is None:
        sites = np.array(["all"] * len(y), dtype=object)
    names, counts = np.unique(sites, return_counts=True)
    order = [str(names[i]) for i in np.argsort(-counts, kind="stable")]
    keep = order[:MAX_SITE_PLOTS]
    grouped = np.array([s if s in keep else "other-sites" for s in sites], dtype=object)
    groups = keep + (["other-sites"] if len(order) > MAX_SITE_PLOTS else [])
    paths: list[Path] = []
    per_site: dict[str, Any] = {}

    def draw(ax, pp, yy, label):
        bins = reliability_bins(pp, yy)
        ax.plot([b["predicted"] for b in bins], [b["observed"] for b in bins], "o-", label=label)

    fig, ax = plt.subplots(figsize=(5, 5))
    for k, site in enumerate(groups):
        m = grouped == site
        from models.statistics import binary_ece as _bece

        ece = _bece(p[m], y[m])
        per_site[site] = {"n_images": int(m.sum()), "ece": ece, "bins": reliability_bins(p[m], y[m])}
        draw(ax, p[m], y[m], f"{site} (n={int(m.sum())}, ECE {ece:.3f})")
        f2, a2 = plt.subplots(figsize=(4.5, 4.5))
        draw(a2, p[m], y[m], f"ECE {ece:.3f}")
        a2.plot([0, 1], [0, 1], "k--", lw=0.8)
        a2.set(xlabel="predicted P(covid19)", ylabel="observed covid19 rate", xlim=(0, 1), ylim=(0, 1),
               title=f"Reliability P(covid19): {site[:40]} (n={int(m.sum())})")
        a2.legend(loc="upper left", fontsize=8)
        f2.tight_layout()
        slug = re.sub(r"[^A-Za-z0-9_-]+", "-", site)[:40].strip("-") or f"site{k}"
        paths.append(out_dir / f"reliability_covid19_site-{slug}.png")
        f2.savefig(paths[-1], dpi=90)
        plt.close(f2)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="predicted P(covid19)", ylabel="observed covid19 rate", xlim=(0, 1), ylim=(0, 1),
           title="Reliability of P(covid19) by site")
    ax.legend(loc="upper left", fontsize=6)
    fig.tight_layout()
    paths.insert(0, out_dir / "reliability_covid19.png")
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    cal = evaluation.get("calibration")
    if isinstance(cal, dict) and isinstance(cal.get("covid19"), dict):
        cal["covid19"]["by_site"] = per_site
    return paths


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)
