"""The shortcut-battery table (issue 14) as rows, for the model card and the compliance report.

One source for both: ``shortcut_table(evaluation) -> list[dict]`` with ``name``, ``what``, ``auroc``
``{value, ci_low, ci_high}`` and ``n`` (images, covid19, other); ``shortcut_differences(evaluation)``
for the paired AUROC differences. Empty when the evaluation carries no ``shortcut`` section.
"""
from __future__ import annotations

from typing import Any

ROWS = (
    ("model", "the model (image + vitals)", ("model",)),
    ("image_only", "image-only ablation (FusionNet, same split/seed)", ("ablations", "image_only", "auroc")),
    ("vitals_only", "vitals-only ablation (logistic regression)", ("ablations", "vitals_only", "auroc")),
    ("missingness_only", "missing-indicators-only ablation (logistic regression)",
     ("ablations", "missingness_only", "auroc")),
    ("masked_lungs", "model, lung fields blanked (border/text kept), vitals constant", ("masked_lungs", "auroc")),
    ("lungs_only", "model, only the lung fields kept, vitals constant", ("lungs_only", "auroc")),
)
DIFFERENCES = ("fusion_minus_vitals_only", "fusion_minus_missingness_only", "fusion_minus_image_only")


def _get(d: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def _ci(d: Any) -> dict:
    d = d if isinstance(d, dict) else {}
    return {k: d.get(k) for k in ("value", "ci_low", "ci_high")}


def shortcut_table(evaluation: dict) -> list[dict]:
    sc = (evaluation or {}).get("shortcut")
    if not isinstance(sc, dict):
        return []
    n = {"images": sc.get("n_images"), "covid19": sc.get("n_covid19"), "other": sc.get("n_other")}
    return [{"name": name, "what": what, "auroc": _ci(_get(sc, path)), "n": n} for name, what, path in ROWS
            if _get(sc, path) is not None]


def shortcut_differences(evaluation: dict) -> list[dict]:
    sc = (evaluation or {}).get("shortcut")
    if not isinstance(sc, dict):
        return []
    return [{"name": k, **_ci(sc.get(k))} for k in DIFFERENCES if isinstance(sc.get(k), dict)]


def fmt_ci(d: dict) -> str:
    v = d.get("value")
    if v is None:
        return "-"
    if d.get("ci_low") is None:
        return f"{v:.3f}"
    return f"{v:.3f} ({d['ci_low']:.3f}–{d['ci_high']:.3f})"
