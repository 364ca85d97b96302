"""Deployment prevalence: PPV/NPV at the prevalences a hospital will see, and a decision curve.

The test split's prevalence (often ~80 % COVID-19 in public collections) is not the deployment
prevalence. PPV and NPV are recomputed from the sensitivity and specificity at the operating
threshold by Bayes' rule:

    PPV(π) = sens·π / (sens·π + (1 − spec)(1 − π)),   NPV(π) = spec(1 − π) / (spec(1 − π) + (1 − sens)π)

with 95 % intervals from the same patient-level bootstrap as the rest of the evaluation (each draw
resamples patients, recomputes sens and spec, then PPV/NPV), percentile method.

Decision curve (Vickers & Elkin 2006), at a prevalence π from sens/spec at each threshold probability
p_t (so it holds at deployment prevalences, not only the test split's):

    net benefit(model)     = sens(p_t)·π − (1 − spec(p_t))(1 − π)·p_t/(1 − p_t)
    net benefit(treat all) = π − (1 − π)·p_t/(1 − p_t),   net benefit(treat none) = 0

Note that P(covid19) is calibrated on the validation split's prevalence; at another prevalence the
threshold probability p_t and the model's probability are not on the same scale unless recalibrated
(the curve still ranks the strategies at each p_t by the sens/spec the model achieves there).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

PREVALENCES = (0.02, 0.05, 0.10, 0.20, 0.30)
DECISION_THRESHOLDS = tuple(round(x, 2) for x in np.arange(0.01, 0.96, 0.01))


def _ppv(sens, spec, pi):
    den = sens * pi + (1 - spec) * (1 - pi)
    return np.where(den > 0, sens * pi / np.where(den > 0, den, 1), np.nan)


def _npv(sens, spec, pi):
    den = spec * (1 - pi) + (1 - sens) * pi
    return np.where(den > 0, spec * (1 - pi) / np.where(den > 0, den, 1), np.nan)


def _ci(value, samples) -> dict:
    arr = np.asarray(samples, dtype=float)
    arr = arr[np.isfinite(arr)]
    if value is None or not np.isfinite(value) or len(arr) < 10:
        return {"value": None if value is None or not np.isfinite(value) else float(value), "ci_low": None,
                "ci_high": None}
    return {"value": float(value), "ci_low": float(np.percentile(arr, 2.5)), "ci_high": float(np.percentile(arr, 97.5))}


def ppv_npv_at_prevalences(is_covid, p_covid, threshold: float, patient_ids, *,
                           prevalences: Sequence[float] = PREVALENCES, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """``{"threshold", "sensitivity", "specificity", "by_prevalence": {"0.02": {"ppv": {...}, "npv": {...}}},
    "method"}``; values are None when a class is absent."""
    y = np.asarray(is_covid, dtype=bool)
    pred = np.asarray(p_covid, dtype=float) >= threshold
    from models.statistics import cluster_codes

    k, inv = cluster_codes(patient_ids)  # first-appearance order: not the pseudonyms' sort order

    def sens_spec(w):
        tp, fn = (w * (pred & y)).sum(), (w * (~pred & y)).sum()
        tn, fp = (w * (~pred & ~y)).sum(), (w * (pred & ~y)).sum()
        return (tp / (tp + fn) if tp + fn > 0 else np.nan), (tn / (tn + fp) if tn + fp > 0 else np.nan)

    sens, spec = sens_spec(np.ones(len(y)))
    rng = np.random.default_rng(seed)
    boot = np.array([sens_spec(np.bincount(rng.integers(0, k, k), minlength=k)[inv].astype(float))
                     for _ in range(n_bootstrap if k else 0)]).reshape(-1, 2)
    out = {"threshold": float(threshold), "sensitivity": None if np.isnan(sens) else float(sens),
           "specificity": None if np.isnan(spec) else float(spec), "by_prevalence": {},
           "test_prevalence": float(y.mean()) if len(y) else None,
           "method": f"Bayes' rule from sensitivity/specificity at the operating threshold; 95% CI: patient bootstrap "
                     f"(n={n_bootstrap}, percentile)"}
    for pi in prevalences:
        defined = not (np.isnan(sens) or np.isnan(spec))
        ppv = float(_ppv(sens, spec, pi)) if defined else None
        npv = float(_npv(sens, spec, pi)) if defined else None
        out["by_prevalence"][f"{pi:g}"] = {
            "prevalence": pi,
            "ppv": _ci(ppv, _ppv(boot[:, 0], boot[:, 1], pi) if len(boot) else []),
            "npv": _ci(npv, _npv(boot[:, 0], boot[:, 1], pi) if len(boot) else [])}
    return out


def decision_curve(is_covid, p_covid, *, prevalences: Sequence[float] = (0.05, 0.10, 0.20),
                   thresholds: Sequence[float] = DECISION_THRESHOLDS) -> dict:
    """Net benefit of the model, treat-all and treat-none at each threshold probability, at the test
    split's prevalence and at ``prevalences``."""
    y = np.asarray(is_covid, dtype=bool)
    p = np.asarray(p_covid, dtype=float)
    t = np.asarray(thresholds, dtype=float)
    if not y.any() or y.all():
        return {"thresholds": t.tolist(), "curves": {}, "note": "one class absent: decision curve undefined"}
    sens = np.array([(p[y] >= x).mean() for x in t])
    spec = np.array([(p[~y] < x).mean() for x in t])
    odds = t / (1 - t)
    curves = {}
    for name, pi in [("test", float(y.mean())), *[(f"{x:g}", float(x)) for x in prevalences]]:
        curves[name] = {"prevalence": pi, "model": (sens * pi - (1 - spec) * (1 - pi) * odds).tolist(),
                        "treat_all": (pi - (1 - pi) * odds).tolist(), "treat_none": [0.0] * len(t)}
    return {"thresholds": t.tolist(), "curves": curves,
            "method": "net benefit from sensitivity/specificity at each threshold probability, at each prevalence"}


def plot_decision_curve(curve: dict, out_dir: Path) -> Path | None:
    """``decision_curve.png`` beside the other evaluation plots (None when undefined)."""
    if not curve.get("curves"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.asarray(curve["thresholds"])
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for i, (name, c) in enumerate(curve["curves"].items()):
        color = f"C{i}"
        label = f"π={c['prevalence']:.2f}" + (" (test split)" if name == "test" else "")
        ax.plot(t, c["model"], color=color, lw=2, label=f"model, {label}")
        ax.plot(t, c["treat_all"], color=color, lw=1, ls="--")
    ax.axhline(0, color="k", lw=0.8, label="treat none")
    ax.plot([], [], color="grey", ls="--", label="treat all (same colour = same π)")
    top = max(c["prevalence"] for c in curve["curves"].values())
    ax.set(xlabel="threshold probability", ylabel="net benefit", title="Decision curve (COVID-19)",
           ylim=(-0.05, top + 0.05), xlim=(0, 1))
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    out = Path(out_dir) / "decision_curve.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def prevalence_report(is_covid, p_covid, threshold: float, patient_ids, *, n_bootstrap: int = 1000,
                      seed: int = 0) -> dict:
    """``evaluation.json["prevalence"]``: PPV/NPV at ``PREVALENCES`` with intervals + the decision curve."""
    out = ppv_npv_at_prevalences(is_covid, p_covid, threshold, patient_ids, n_bootstrap=n_bootstrap, seed=seed)
    out["decision_curve"] = decision_curve(is_covid, p_covid)
    return out
