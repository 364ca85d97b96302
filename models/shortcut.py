"""Shortcut battery: does the model look at the lungs, or at the hospital, the scanner, the text, the gaps?

Public COVID-19 radiograph collections let a model learn the source instead of the disease (DeGrave
et al., Nat Mach Intell 2021). This module measures it, in the same run, on the same split and seeds
as the model, and writes ``evaluation.json["shortcut"]``:

- ``ablations.{image_only, vitals_only, missingness_only}``: AUROC COVID-19 vs rest ``{value, ci_low,
  ci_high}`` (clustered DeLong, ``models.delong``) of
    * ``image_only``: a FusionNet with ``modalities=("image",)``, trained exactly like the model (same
      loaders, epochs, early stopping, learning rate, seed; ``models.train.fit_image_only``);
    * ``vitals_only``: a logistic regression (L2, C=1, class-balanced) on the model's own encoded
      vitals features (standardised values + missing indicators + sex one-hot, ``VitalsEncoder``),
      fitted on the training split — the split is by patient, so no patient is on both sides;
    * ``missingness_only``: the same logistic regression on the missing indicators alone (six vitals
      + sex unknown): what the *pattern* of recorded fields says about the label.
  The logistic regressions cost milliseconds; a FusionNet(vitals) would cost a training run and on
  16 features is no stronger.
- ``fusion_minus_vitals_only``, ``fusion_minus_missingness_only`` (and ``fusion_minus_image_only``):
  paired AUROC differences on the same test images (clustered DeLong, ``paired_auroc_difference``).
- ``masked_lungs.auroc`` / ``lungs_only.auroc``: the trained model scored on the test images with the
  fixed lung fields blanked (``models.lung_mask.mask_lungs``: border, text and markers left) / with only
  the lung fields kept. Vitals are held at the same constant for every image (each field at its
  training mean, sex unknown), so only the image can rank the cases; ``image_with_constant_vitals``
  is the unmasked reference under the same constant.
- ``site_probe``: how well the frozen image features (the model's image encoder, pooled) predict the
  site / source: multinomial logistic regression, 5-fold cross-validation grouped by patient over the
  labelled rows, balanced accuracy with a patient-bootstrap interval, against chance (1/K) and
  against predicting the site from the label alone (the part explained by confounding with the label).
- ``confounding``: Cramér's V of site/source against the label (``models.confounding``).
- ``cost``: seconds of the fusion model's training loop vs the battery (budget: ≤ 3×).

Events: none; the caller records what it records.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.delong import auroc_ci, paired_auroc_difference
from models.network import CLASSES

COST_BUDGET_RATIO = 3.0
PROBE_MIN_PER_CLASS = 10
PROBE_MAX_ROWS = 3000
ABLATIONS_FILE = "ablations.json"
IMAGE_ONLY_WEIGHTS = "image_only.pt"


# ------------------------------------------------------------------------------------- tabular models
def tabular_features(frame, vitals_encoder, kind: str) -> tuple[np.ndarray, list[str]]:
    X = vitals_encoder.encode_frame(frame).astype(np.float64)
    names = vitals_encoder.feature_names
    if kind == "vitals_only":
        return X, names
    if kind == "missingness_only":
        n = len(vitals_encoder.fields)
        cols = list(range(n, 2 * n)) + [2 * n + vitals_encoder.sex_categories.index("unknown")]
        return X[:, cols], [names[c] for c in cols]
    raise ValueError(f"unknown tabular ablation {kind!r}")


def fit_logistic(X: np.ndarray, is_covid: np.ndarray, names: list[str], seed: int = 0) -> dict:
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(is_covid, dtype=int)
    if len(np.unique(y)) < 2:
        return {"features": names, "coef": [0.0] * X.shape[1], "intercept": 0.0, "constant": True}
    lr = LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000, random_state=seed)
    lr.fit(X, y)
    return {"features": names, "coef": lr.coef_[0].tolist(), "intercept": float(lr.intercept_[0]),
            "model": "logistic regression, L2, C=1, class_weight=balanced"}


def predict_logistic(params: dict, X: np.ndarray) -> np.ndarray:
    z = X @ np.asarray(params["coef"], dtype=np.float64) + float(params["intercept"])
    return 1.0 / (1.0 + np.exp(-z))


# ------------------------------------------------------------------------------------ image-only net
def wrap_network(net, base_config: dict):
    """A ClinicalModel around an ablation network (shares the model's vitals encoder; temperature 1)."""
    from models.serving import ClinicalModel

    cfg = dict(base_config)
    cfg.update(network=net.config(), temperature=1.0, ood_stats={})
    return ClinicalModel(net, cfg, version="ablation", device="cpu")


# --------------------------------------------------------------------------------------- ablations
class Ablations:
    """The three ablation models of one training run (saved beside its evaluation)."""

    def __init__(self, image_only=None, vitals_only: dict | None = None, missingness_only: dict | None = None,
                 history: list | None = None, seconds: float = 0.0):
        self.image_only = image_only          # ClinicalModel (image) or None
        self.vitals_only = vitals_only        # logistic-regression parameters
        self.missingness_only = missingness_only
        self.history = history or []
        self.seconds = seconds

    def save(self, out_dir: Path) -> Path:
        import torch

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = {"vitals_only": self.vitals_only, "missingness_only": self.missingness_only,
                "image_only": None, "history": self.history, "seconds": self.seconds}
        if self.image_only is not None:
            torch.save(self.image_only.net.state_dict(), out_dir / IMAGE_ONLY_WEIGHTS)
            meta["image_only"] = {"network": self.image_only.net.config(), "weights": IMAGE_ONLY_WEIGHTS}
        (out_dir / ABLATIONS_FILE).write_text(json.dumps(meta, indent=2))
        return out_dir

    @classmethod
    def load(cls, folder: Path, base_config: dict) -> "Ablations":
        import torch

        from models.network import FusionNet

        folder = Path(folder)
        meta = json.loads((folder / ABLATIONS_FILE).read_text())
        image_only = None
        if meta.get("image_only"):
            net = FusionNet(**meta["image_only"]["network"])
            net.load_state_dict(torch.load(folder / meta["image_only"]["weights"], map_location="cpu",
                                           weights_only=True))
            image_only = wrap_network(net.eval(), base_config)
        return cls(image_only, meta.get("vitals_only"), meta.get("missingness_only"), meta.get("history"),
                   float(meta.get("seconds") or 0.0))


def fit_tabular_ablations(train_frame, vitals_encoder, seed: int = 0) -> tuple[dict, dict]:
    y = (train_frame["label"] == "covid19").to_numpy()
    out = []
    for kind in ("vitals_only", "missingness_only"):
        X, names = tabular_features(train_frame, vitals_encoder, kind)
        out.append(fit_logistic(X, y, names, seed))
    return out[0], out[1]


# ------------------------------------------------------------------------------------------- scoring
def constant_vitals(vitals_encoder) -> dict:
    """Every field at its training mean, sex unknown: the same vitals for every image."""
    return {**{f: vitals_encoder.mean.get(f, 0.0) for f in vitals_encoder.fields}, "sex": "unknown"}


def p_covid(model, images, vitals) -> np.ndarray:
    """Ranking score for COVID-19 vs rest: the calibrated log-odds of P(covid19).

    Monotone in P(covid19), but it does not saturate: on out-of-distribution inputs (a blanked lung
    field) the probabilities can all round to 1.0 in float64 and tie, which would fake an AUROC of 0.5.
    """
    if not len(vitals):
        return np.zeros(0)
    z = np.asarray(model.logits(images, vitals), dtype=np.float64) / float(model.temperature)
    rest = z[:, 1:]
    m = rest.max(axis=1)
    return z[:, 0] - (m + np.log(np.exp(rest - m[:, None]).sum(axis=1)))


def _auroc_entry(y, score, clusters, extra: dict | None = None) -> dict:
    return {"auroc": auroc_ci(y, score, clusters), **(extra or {})}


def image_features(model, images: Sequence[np.ndarray], batch: int = 64) -> np.ndarray:
    """Frozen, pooled image-encoder features (N, F) of the model."""
    import torch

    from models.transforms import resize_image

    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = np.stack([resize_image(np.asarray(im, np.float32), model.image_size) for im in images[i:i + batch]])
            t = (torch.from_numpy(x).to(model.device) - 0.5) / 0.25
            out.append(model.net.image_encoder(t).float().cpu().numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, 0))


def site_probe(model, frame, images: Sequence[np.ndarray], *, attributes: Sequence[str] = ("source", "site"),
               seed: int = 0, n_bootstrap: int = 1000, min_per_class: int = PROBE_MIN_PER_CLASS) -> dict:
    """Balanced accuracy of predicting each attribute from the frozen image features (see module doc)."""
    out: dict[str, Any] = {}
    if "image" not in getattr(model, "modalities", ()):
        return {"note": "the model has no image branch"}
    feats = None
    for attr in attributes:
        if attr not in frame:
            continue
        values = frame[attr].fillna("").astype(str).replace("", "unknown").to_numpy()
        uniq, counts = np.unique(values, return_counts=True)
        keep_vals = uniq[counts >= min_per_class]
        entry: dict[str, Any] = {"attribute": attr, "n_values": int(len(uniq)), "min_per_class": min_per_class}
        if len(keep_vals) < 2:
            out[attr] = {**entry, "value": None, "ci_low": None, "ci_high": None,
                         "note": f"fewer than two {attr} values with ≥ {min_per_class} images: no probe"}
            continue
        if feats is None:
            feats = image_features(model, images)
        m = np.isin(values, keep_vals)
        out[attr] = {**entry, **_probe(feats[m], values[m], frame["label"].astype(str).to_numpy()[m],
                                       frame["patient_id"].astype(str).to_numpy()[m], seed, n_bootstrap)}
    return out


def _probe(X, target, label, patients, seed: int, n_bootstrap: int) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    classes, y = np.unique(target, return_inverse=True)
    k = len(classes)
    n_splits = int(min(5, np.bincount(y).min(), len(np.unique(patients))))
    if n_splits < 2:
        return {"value": None, "ci_low": None, "ci_high": None, "note": "too few patients per value for 2 folds"}
    # groups as first-appearance codes: the seeded fold shuffle must not depend on the pseudonyms' sort order
    from models.statistics import cluster_codes

    groups = cluster_codes(patients)[1]
    folds = list(StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(X, y, groups))
    pred_img, pred_lab = np.zeros(len(y), int), np.zeros(len(y), int)
    lab = OneHotEncoder(handle_unknown="ignore").fit(label.reshape(-1, 1))
    L = lab.transform(label.reshape(-1, 1)).toarray()
    for tr, te in folds:
        if len(np.unique(y[tr])) < 2:
            pred_img[te] = pred_lab[te] = np.bincount(y[tr]).argmax()
            continue
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, class_weight="balanced", max_iter=3000))
        pred_img[te] = clf.fit(X[tr], y[tr]).predict(X[te])
        clf2 = LogisticRegression(C=1.0, class_weight="balanced", max_iter=3000)
        pred_lab[te] = clf2.fit(L[tr], y[tr]).predict(L[te])

    def bacc(pred, w):
        rec = [(w * ((y == c) & (pred == c))).sum() / (w * (y == c)).sum() for c in range(k) if (w * (y == c)).sum() > 0]
        return float(np.mean(rec)) if rec else np.nan

    n_p, inv = cluster_codes(patients)  # first-appearance order: not the pseudonyms' sort order
    rng = np.random.default_rng(seed)
    bi, bl = [], []
    for _ in range(n_bootstrap):
        w = np.bincount(rng.integers(0, n_p, n_p), minlength=n_p)[inv].astype(float)
        bi.append(bacc(pred_img, w))
        bl.append(bacc(pred_lab, w))

    def ci(value, samples):
        s = np.asarray(samples)
        s = s[np.isfinite(s)]
        return {"value": value, "ci_low": float(np.percentile(s, 2.5)) if len(s) >= 10 else None,
                "ci_high": float(np.percentile(s, 97.5)) if len(s) >= 10 else None}

    return {**ci(bacc(pred_img, np.ones(len(y))), bi), "metric": "balanced accuracy", "chance": 1.0 / k,
            "n_classes": int(k), "n_images": int(len(y)), "n_patients": int(n_p), "folds": n_splits,
            "counts": {str(c): int((y == i).sum()) for i, c in enumerate(classes)},
            "label_only": ci(bacc(pred_lab, np.ones(len(y))), bl),
            "method": "multinomial logistic regression (standardised features, C=0.1, balanced) on the frozen "
                      "pooled image-encoder features; StratifiedGroupKFold by patient; patient bootstrap CI",
            "label_only_method": "the same probe on the one-hot label alone (site predictable from the label)"}


# --------------------------------------------------------------------------------------------- report
def shortcut_report(model, ablations: Ablations | None, test_frame, test_images: Sequence[np.ndarray], *,
                    p_model: np.ndarray | None = None, probe_frame=None, probe_images=None, manifest=None,
                    seed: int = 0, n_bootstrap: int = 1000, fusion_seconds: float | None = None,
                    ablation_seconds: float | None = None) -> dict:
    """``evaluation.json["shortcut"]`` for ``model`` on the test rows (see the module docstring)."""
    t0 = time.perf_counter()
    vit = test_frame.to_dict("records")
    y = (test_frame["label"].astype(str) == "covid19").to_numpy()
    clusters = test_frame["patient_id"].astype(str).to_numpy()
    images = list(test_images)
    p_model = p_covid(model, images, vit) if p_model is None else np.asarray(p_model, float)
    out: dict[str, Any] = {
        "question": "COVID-19 vs rest", "n_images": int(len(y)), "n_patients": int(len(np.unique(clusters))),
        "n_covid19": int(y.sum()), "n_other": int((~y).sum()),
        "model": _auroc_entry(y, p_model, clusters)["auroc"],
        "interval_method": "DeLong, clustered by patient (Obuchowski); floored at perfect separation (models.delong)",
        "ablations": {}, "warnings": []}
    abl = out["ablations"]
    scores: dict[str, np.ndarray] = {}
    if ablations is not None:
        enc = model.vitals_encoder
        if ablations.image_only is not None:
            scores["image_only"] = p_covid(ablations.image_only, images, vit)
            abl["image_only"] = {"auroc": auroc_ci(y, scores["image_only"], clusters),
                                 "model": "FusionNet(modalities=image), same loaders/epochs/seed as the model"}
        for kind in ("vitals_only", "missingness_only"):
            params = getattr(ablations, kind)
            if params is None:
                continue
            X, _ = tabular_features(test_frame, enc, kind)
            scores[kind] = predict_logistic(params, X)
            abl[kind] = {"auroc": auroc_ci(y, scores[kind], clusters), "model": params.get("model", "logistic"),
                         "features": params["features"]}
        for kind, s in scores.items():
            out[f"fusion_minus_{kind}"] = paired_auroc_difference(y, p_model, s, clusters)
    else:
        out["warnings"].append("no ablation models for this version: ablations not computed")
    if "image" in model.modalities:
        const = [constant_vitals(model.vitals_encoder)] * len(images)
        out["image_with_constant_vitals"] = {"auroc": auroc_ci(y, p_covid(model, images, const), clusters)}
        from models.lung_mask import LUNG_ELLIPSES, keep_lungs, mask_lungs

        out["masked_lungs"] = {"auroc": auroc_ci(y, p_covid(model, [mask_lungs(im) for im in images], const), clusters),
                               "mask": {"ellipses": [list(map(list, e)) for e in LUNG_ELLIPSES],
                                        "fill": "mean of the blanked region", "vitals": "constant (training means)"}}
        out["lungs_only"] = {"auroc": auroc_ci(y, p_covid(model, [keep_lungs(im) for im in images], const), clusters)}
    else:
        out["warnings"].append("the model has no image branch: masked-lung tests not applicable")
    if probe_frame is not None and probe_images is not None:
        out["site_probe"] = site_probe(model, probe_frame, probe_images, seed=seed, n_bootstrap=n_bootstrap)
    if manifest is not None:
        from models.confounding import confounding_summary

        conf = confounding_summary(manifest)
        out["confounding"] = {k: ({kk: vv for kk, vv in v.items() if kk != "counts"} if isinstance(v, dict) else v)
                              for k, v in conf.items()}
        out["warnings"].extend(conf["warnings"])
    scoring = time.perf_counter() - t0
    battery = scoring + (ablation_seconds or 0.0)
    out["cost"] = {"fusion_training_seconds": fusion_seconds, "ablation_training_seconds": ablation_seconds,
                   "scoring_seconds": scoring, "battery_seconds": battery,
                   "ratio_to_fusion_training": (battery / fusion_seconds) if fusion_seconds else None,
                   "budget_ratio": COST_BUDGET_RATIO,
                   "within_budget": (battery / fusion_seconds <= COST_BUDGET_RATIO) if fusion_seconds else None}
    return out


# ------------------------------------------------------------------------------------ entry points
def probe_rows(manifest, ds, seed: int = 0, limit: int = PROBE_MAX_ROWS):
    """Labelled rows (at most ``limit``, sampled with the seed) and their cached arrays, for the probe."""
    rows = manifest[manifest["label"].isin(CLASSES)].reset_index(drop=True)
    if len(rows) > limit:
        rows = rows.sample(limit, random_state=seed).reset_index(drop=True)
    return rows, [ds.array(r) for _, r in rows.iterrows()]


def battery_at_training(*, clinical, splits: dict, ds, te_frame, te_imgs, p_test, vitals_encoder, modalities,
                        train_image_only, seed: int, fusion_seconds: float, n_bootstrap: int, out_dir: Path,
                        console=None) -> dict:
    """Train the ablations, save them under ``out_dir`` and return the shortcut section.

    ``train_image_only()`` → a CPU FusionNet(modalities=image) and its history: the caller's training loop
    (``models.train.fit_image_only``) run on the model's own loaders, schedule and seed.
    """
    t0 = time.perf_counter()
    vit_params, miss_params = fit_tabular_ablations(splits["train"], vitals_encoder, seed)
    image_only, history = None, []
    if tuple(modalities) == ("image", "vitals"):
        if console is not None:
            console.print("shortcut battery: training the image-only ablation (same split, loaders and seed)")
        net, history = train_image_only()
        image_only = wrap_network(net, clinical.config)
    ablations = Ablations(image_only, vit_params, miss_params, history, time.perf_counter() - t0)
    ablations.save(out_dir)
    rows, imgs = probe_rows(ds.manifest, ds, seed)
    return shortcut_report(clinical, ablations, te_frame, te_imgs, p_model=p_test, probe_frame=rows,
                           probe_images=imgs, manifest=ds.manifest, seed=seed, n_bootstrap=n_bootstrap,
                           fusion_seconds=fusion_seconds, ablation_seconds=ablations.seconds)
