"""Champion vs challenger on the same test sets, overall and per variant tag, with bootstrap CIs.

The question a new-variant batch raises is "does the model still find COVID-19 in *these* images?",
so the comparison is stated on P(covid19) at each model's own stored operating threshold:
sensitivity, specificity, PPV, NPV, and the threshold-free AUROC. Both models score the very same
images; the 95 % confidence intervals come from a **patient-level (cluster) bootstrap** — patients are
resampled, not images, since images of one patient are not independent — and the CI of the
difference (challenger − champion) uses the *same* resamples for both models (paired bootstrap), so
it is much narrower than the two separate intervals would suggest.

The report is a JSON document plus a Markdown rendering; the pipeline logs both to MLflow
(``comparison/comparison.json`` and ``comparison/comparison.md``) on the pipeline run and on the
challenger's training run.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

METRICS = ["auroc", "sensitivity", "specificity", "ppv", "npv"]
BASE_TAG = "base"  # how the report names images with no variant tag


# ------------------------------------------------------------------------------------------------
# Predictions
# ------------------------------------------------------------------------------------------------
def predict_dataset(version, ds, split: str | None = "test", model=None, batch: int = 32) -> pd.DataFrame:
    """Score the labelled rows of ``ds`` (one split, or all when ``split`` is None) with a model version.

    Returns one row per image: ``image_hash``, ``patient_id``, ``label``, ``variant``, ``site``,
    ``y`` (1 = covid19), ``p_covid19``, ``positive`` (decision at the model's operating threshold).
    """
    from models.datasets import TRAINABLE_LABELS

    if model is None:
        from models.registry import load_clinical_model

        model = load_clinical_model(version)
    df = ds.manifest
    if split is not None:
        df = df[df["split"] == split]
    df = df[df["label"].isin(TRAINABLE_LABELS)].reset_index(drop=True)
    probs: list[float] = []
    decisions: list[bool] = []
    for start in range(0, len(df), batch):
        chunk = df.iloc[start:start + batch]
        images = [ds.array(r) for _, r in chunk.iterrows()]
        vitals = chunk.to_dict("records")  # the same records models.evaluate passes
        for out in model.predict(images, vitals):
            probs.append(float(out["p_covid19"]))
            decisions.append(out["decision"] == "covid19-positive")
    variant = df["variant"].fillna("").astype(str) if "variant" in df else pd.Series([""] * len(df))
    return pd.DataFrame({
        "image_hash": df["image_hash"].astype(str),
        "patient_id": df["patient_id"].astype(str),
        "label": df["label"].astype(str),
        "variant": variant.replace("", BASE_TAG).values,
        "site": df["site"].astype(str) if "site" in df else "",
        "y": (df["label"] == "covid19").astype(int).values,
        "p_covid19": np.asarray(probs, dtype=float),
        "positive": np.asarray(decisions, dtype=bool),
        "model_version": str(getattr(model, "version", version)),
    })


# ------------------------------------------------------------------------------------------------
# Metrics and bootstrap
# ------------------------------------------------------------------------------------------------
def auroc(y: np.ndarray, p: np.ndarray) -> float | None:
    """Mann–Whitney AUROC with ties counted half; None when one class is absent."""
    y = np.asarray(y, dtype=int)
    n_pos = int(y.sum())
    n_neg = int(len(y) - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = pd.Series(p).rank(method="average").to_numpy()
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def point_metrics(y: np.ndarray, p: np.ndarray, pos: np.ndarray) -> dict[str, float | None]:
    y = np.asarray(y, dtype=bool)
    pos = np.asarray(pos, dtype=bool)
    tp = int((y & pos).sum())
    fn = int((y & ~pos).sum())
    tn = int((~y & ~pos).sum())
    fp = int((~y & pos).sum())

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    return {"auroc": auroc(y, p), "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
            "ppv": ratio(tp, tp + fp), "npv": ratio(tn, tn + fn)}


def _patient_resamples(patients: np.ndarray, n_bootstrap: int, seed: int) -> list[np.ndarray]:
    """Row indices of ``n_bootstrap`` patient-level resamples (cluster bootstrap)."""
    rng = np.random.default_rng(seed)
    codes, uniques = pd.factorize(pd.Series(patients))
    rows_of = [np.flatnonzero(codes == i) for i in range(len(uniques))]
    out = []
    for _ in range(n_bootstrap):
        pick = rng.integers(0, len(uniques), len(uniques))
        out.append(np.concatenate([rows_of[i] for i in pick]) if len(pick) else np.array([], dtype=int))
    return out


def _ci(values: list[float | None], alpha: float = 0.05) -> tuple[float | None, float | None]:
    vals = np.asarray([v for v in values if v is not None and not np.isnan(v)], dtype=float)
    if len(vals) < 10:
        return None, None
    return float(np.quantile(vals, alpha / 2)), float(np.quantile(vals, 1 - alpha / 2))


def _with_ci(value, samples) -> dict:
    lo, hi = _ci(samples)
    return {"value": value, "ci_low": lo, "ci_high": hi}


def compare_predictions(champ: pd.DataFrame | None, chall: pd.DataFrame, *, n_bootstrap: int = 1000,
                        seed: int = 0) -> dict:
    """Both models on the same images: per-model metrics with CIs and the paired CI of the difference."""
    if champ is not None:
        merged = chall.merge(champ[["image_hash", "p_covid19", "positive"]], on="image_hash",
                             suffixes=("_chall", "_champ"), how="inner")
    else:
        merged = chall.rename(columns={"p_covid19": "p_covid19_chall", "positive": "positive_chall"})
    y = merged["y"].to_numpy()
    resamples = _patient_resamples(merged["patient_id"].to_numpy(), n_bootstrap, seed)
    out: dict[str, Any] = {"n_images": int(len(merged)), "n_patients": int(merged["patient_id"].nunique()),
                           "n_covid19": int(y.sum()), "metrics": {}}
    pc, sc = merged["p_covid19_chall"].to_numpy(), merged["positive_chall"].to_numpy()
    point_c = point_metrics(y, pc, sc)
    boots_c = [point_metrics(y[i], pc[i], sc[i]) for i in resamples]
    if champ is not None:
        pk, sk = merged["p_covid19_champ"].to_numpy(), merged["positive_champ"].to_numpy()
        point_k = point_metrics(y, pk, sk)
        boots_k = [point_metrics(y[i], pk[i], sk[i]) for i in resamples]
    for m in METRICS:
        entry = {"challenger": _with_ci(point_c[m], [b[m] for b in boots_c])}
        if champ is not None:
            entry["champion"] = _with_ci(point_k[m], [b[m] for b in boots_k])
            diff = None if point_c[m] is None or point_k[m] is None else point_c[m] - point_k[m]
            diffs = [None if a[m] is None or b[m] is None else a[m] - b[m] for a, b in zip(boots_c, boots_k)]
            entry["difference"] = _with_ci(diff, diffs)
        out["metrics"][m] = entry
    return out


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------
def _champion_version(champion: str | None) -> str | None:
    if not champion:
        return None
    from models.registry import resolve_version

    try:
        return str(resolve_version(champion))
    except LookupError:  # no such alias (e.g. no champion yet)
        return None


def compare_champion_challenger(challenger_version, test_sets: list[tuple[str, str | None]], *,
                                champion: str | None = "champion", n_bootstrap: int = 1000,
                                seed: int = 0) -> dict:
    """The comparison report over ``test_sets`` ((dataset, split or None for all labelled rows))."""
    from models.datasets import load_dataset
    from models.registry import load_clinical_model

    challenger_version = str(challenger_version)
    champion_version = _champion_version(champion)
    if champion_version == challenger_version:
        champion_version = None
    chall_model = load_clinical_model(challenger_version)
    champ_model = load_clinical_model(champion_version) if champion_version else None
    report: dict[str, Any] = {
        "challenger_version": challenger_version,
        "champion_version": champion_version,
        "champion_alias": champion,
        "question": "COVID-19 vs rest at each model's own operating threshold (P(covid19))",
        "metrics": METRICS,
        "ci_method": (f"95% percentile intervals from a patient-level bootstrap ({n_bootstrap} resamples, "
                      f"seed {seed}); differences = challenger - champion, paired on the same resamples"),
        "thresholds": {"challenger": getattr(chall_model, "operating_threshold", None),
                       "champion": getattr(champ_model, "operating_threshold", None) if champ_model else None},
        "test_sets": {},
    }
    if champion_version is None:
        report["note"] = "no champion yet: the challenger's results are reported alone"
    for name, split in test_sets:
        ds = load_dataset(name)
        key = name if split is None else f"{name}:{split}"
        chall = predict_dataset(challenger_version, ds, split=split, model=chall_model)
        champ = predict_dataset(champion_version, ds, split=split, model=champ_model) if champ_model else None
        groups = {"all": compare_predictions(champ, chall, n_bootstrap=n_bootstrap, seed=seed)}
        for tag in sorted(set(chall["variant"])):
            sel_c = chall[chall["variant"] == tag]
            sel_k = champ[champ["variant"] == tag] if champ is not None else None
            groups[f"variant={tag}"] = compare_predictions(sel_k, sel_c, n_bootstrap=n_bootstrap, seed=seed)
        report["test_sets"][key] = {"dataset": name, "split": split or "all-labelled",
                                    "dataset_version": ds.version.get("dataset_version"), "groups": groups}
    report["headline"] = _headline(report)
    return report


def _headline(report: dict) -> dict:
    """Sensitivity per test set and variant: the numbers a reviewer reads first."""
    out = {}
    for key, ts in report["test_sets"].items():
        for g, res in ts["groups"].items():
            sens = res["metrics"]["sensitivity"]
            out[f"{key} {g}"] = {k: sens[k] for k in ("champion", "challenger", "difference") if k in sens}
    return out


def _fmt(d: dict | None) -> str:
    if not d or d.get("value") is None:
        return "n/a"
    lo, hi = d.get("ci_low"), d.get("ci_high")
    ci = f" ({lo:.2f} to {hi:.2f})" if lo is not None and hi is not None else ""
    return f"{d['value']:.2f}{ci}"


def _fmt_diff(d: dict | None) -> str:
    if not d or d.get("value") is None:
        return "n/a"
    lo, hi = d.get("ci_low"), d.get("ci_high")
    ci = f" ({lo:+.2f} to {hi:+.2f})" if lo is not None and hi is not None else ""
    return f"{d['value']:+.2f}{ci}"


def report_markdown(report: dict) -> str:
    champ = report.get("champion_version")
    lines = [
        f"# Champion vs challenger — model `covid-cxr` v{report['challenger_version']} "
        f"vs {'v' + str(champ) if champ else '(no champion)'}",
        "",
        f"Question: {report['question']}.  ",
        f"Intervals: {report['ci_method']}.",
        "",
    ]
    if report.get("note"):
        lines += [f"> {report['note']}", ""]
    for key, ts in report["test_sets"].items():
        lines += [f"## Test set `{key}` (dataset version `{ts.get('dataset_version')}`)", "",
                  "| group | n images (covid19) | metric | champion | challenger | difference |",
                  "|---|---|---|---|---|---|"]
        for g, res in ts["groups"].items():
            for m in METRICS:
                e = res["metrics"][m]
                lines.append(f"| {g} | {res['n_images']} ({res['n_covid19']}) | {m} | {_fmt(e.get('champion'))} | "
                             f"{_fmt(e.get('challenger'))} | {_fmt_diff(e.get('difference'))} |")
        lines.append("")
    lines += ["The pipeline never approves: the challenger stays `candidate` until a human approver signs.", ""]
    return "\n".join(lines)
