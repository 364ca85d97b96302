"""Evaluating a *registered* model version on an imported dataset (``cxr evaluate``).

Sits above ``models.evaluate`` (pure metrics on arrays) and ``models.registry`` (MLflow): loads the
version, scores the dataset's labelled rows, writes ``evaluation.json`` + plots, logs them on the
version's training run. Records no audit event: ``model.evaluated`` goes to ``on_event`` and the
caller (``pipelines.lifecycle``) writes it to the audit trail.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from models.evaluate import _json_default, evaluate_predictions, write_plots
from models.events import EventSink, no_event
from models.network import CLASSES


# ------------------------------------------------------------------------ registered-version path
def labelled_rows(manifest, split: str | None):
    df = manifest[manifest["label"].isin(CLASSES)]
    if split and split != "all":
        df = df[df["split"] == split]
    return df.reset_index(drop=True)


class DatasetVersionMismatch(ValueError):
    """The model's own training dataset changed since training: its test split is not the one held out."""


def dataset_version_check(trained_version: Any, current_version: Any) -> dict[str, Any]:
    """``{"status": "match"|"mismatch"|"unverifiable", "trained_on_version", "evaluated_version"}``."""
    t, c = (None if v in (None, "", "untracked") else str(v) for v in (trained_version, current_version))
    status = "unverifiable" if t is None or c is None else ("match" if t == c else "mismatch")
    return {"status": status, "trained_on_version": trained_version, "evaluated_version": current_version}


def evaluate_model_version(model_version: str | int = "champion", dataset_name: str = "", *,
                           split: str | None = None, out: str | Path | None = None, seed: int = 0,
                           n_bootstrap: int = 1000, log_to_mlflow: bool = True,
                           allow_version_mismatch: bool = False, on_event: EventSink | None = None,
                           shortcut: bool = True) -> dict:
    """Evaluate a registered version on a dataset (``cxr evaluate``); returns the evaluation dict.

    ``split=None``: the ``test`` split when the dataset is the version's training dataset, else every
    labelled row. Writes ``evaluation.json`` + PNGs to ``out`` (a file path; the PNGs go beside it)
    or ``CXR_HOME/evaluations/<model>/v<version>/<dataset>/``.

    On the training dataset, the dataset version must be the one the model was trained on (else the
    "test" split may hold rows added after training, or miss rows): a mismatch raises
    ``DatasetVersionMismatch`` unless ``allow_version_mismatch``, and then the evaluation is labelled
    (``dataset_version_check.status == "mismatch"`` and a warning). On another dataset,
    ``provenance`` (models/provenance.py) decides whether it is external validation:
    ``is_external`` is True only when sources, sites and images are disjoint from the training data.
    Adds ``prevalence`` and (``shortcut=True``) the shortcut battery (``models.shortcut``; ablations from
    the version's run).
    """
    from core.config import get_settings
    from models import registry
    from models.datasets import DatasetNotFound, load_dataset
    from models.provenance import external_status

    model = registry.load_clinical_model(model_version)
    ds = load_dataset(dataset_name)
    training_info = model.config.get("training", {})
    trained_on = training_info.get("dataset")
    same_dataset = trained_on == dataset_name
    version_check = None
    if same_dataset:
        version_check = dataset_version_check(training_info.get("dataset_version"),
                                              ds.version.get("dataset_version"))
        if version_check["status"] == "mismatch" and not allow_version_mismatch:
            raise DatasetVersionMismatch(
                f"model {model.name} v{model.version} was trained on {dataset_name} version "
                f"{version_check['trained_on_version']}, but data/{dataset_name} is now version "
                f"{version_check['evaluated_version']}: its test split is not the held-out set the model was "
                f"selected against. Check out the training version (git checkout + dvc checkout data/"
                f"{dataset_name}.dvc), or pass --allow-version-mismatch to evaluate anyway (labelled as such)")
        provenance = {"is_external": False, "reasons": ["this is the model's own training dataset"],
                      "method": "same dataset"}
    else:
        try:
            training_manifest = load_dataset(trained_on).manifest if trained_on else None
        except DatasetNotFound:
            training_manifest = None
        provenance = external_status(training_manifest, ds.manifest)
    external = bool(provenance["is_external"])
    if split is None:
        split = "test" if same_dataset else "all"
    rows = labelled_rows(ds.manifest, split)
    images = [ds.array(r) for _, r in rows.iterrows()]
    vitals = rows.to_dict("records")
    logits = model.logits(images, vitals) if len(rows) else np.zeros((0, len(CLASSES)))
    labels = rows["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy(dtype=int)
    evaluation, curves = evaluate_predictions(
        labels, logits, temperature=model.temperature, threshold=model.operating_threshold,
        patient_ids=rows["patient_id"].astype(str).tolist(), meta=rows, n_bootstrap=n_bootstrap, seed=seed,
        threshold_selection=model.config.get("threshold_selection"))
    # deployment prevalence + shortcut battery (issue 14): the ablations trained with the version are
    # re-scored from its run artefacts; masked-lung tests and the site probe run on these rows
    from models.prevalence import plot_decision_curve, prevalence_report

    p_rows = curves["probs"][:, 0] if len(rows) else np.zeros(0)
    evaluation["prevalence"] = prevalence_report(labels == 0, p_rows, model.operating_threshold,
                                                 rows["patient_id"].astype(str).tolist(), n_bootstrap=n_bootstrap,
                                                 seed=seed)
    if shortcut and len(rows):
        from models.shortcut import shortcut_report

        ablations = _load_ablations(model)
        probe = labelled_rows(ds.manifest, "all")
        probe_imgs = images if split == "all" else [ds.array(r) for _, r in probe.iterrows()]
        evaluation["shortcut"] = shortcut_report(model, ablations, rows, images, p_model=p_rows, probe_frame=probe,
                                                 probe_images=probe_imgs, manifest=ds.manifest, seed=seed,
                                                 n_bootstrap=n_bootstrap)
        evaluation["warnings"] = list(dict.fromkeys([*evaluation["warnings"], *evaluation["shortcut"]["warnings"]]))
    role = "internal-test" if same_dataset else ("external" if external else "internal-other-dataset")
    evaluation.update({"dataset": dataset_name, "dataset_version": ds.version.get("dataset_version"),
                       "split": split, "is_external": external, "evaluation_role": role,
                       "provenance": provenance, "model_name": model.name,
                       "model_version": model.version, "trained_on": trained_on,
                       "trained_on_version": training_info.get("dataset_version"),
                       "dataset_version_check": version_check})
    if version_check and version_check["status"] == "mismatch":
        evaluation["warnings"].insert(0, f"DATASET VERSION MISMATCH: trained on {dataset_name} "
                                         f"{version_check['trained_on_version']}, evaluated on "
                                         f"{version_check['evaluated_version']} (--allow-version-mismatch)")
    elif version_check and version_check["status"] == "unverifiable":
        evaluation["warnings"].append("dataset version not recorded/tracked: cannot verify it is the training version")
    if not same_dataset and not external:
        evaluation["warnings"].append("not external validation: " + "; ".join(provenance["reasons"]))
    if out:
        out_path = Path(out)
    else:
        out_path = (get_settings().state_dir / "evaluations" / model.name / f"v{model.version}" / dataset_name
                    / "evaluation.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    plot_dir = out_path.parent
    plots = write_plots(evaluation, plot_dir, curves)
    dc = plot_decision_curve(evaluation["prevalence"]["decision_curve"], plot_dir)
    if dc is not None:
        plots.append(dc)
    out_path.write_text(json.dumps(evaluation, indent=2, default=_json_default))
    evaluation["artifacts"] = {"evaluation_json": str(out_path), "plots": [str(p) for p in plots]}
    if log_to_mlflow and model.run_id:
        registry.log_external_evaluation(model.version, dataset_name, split, evaluation, plots)
    (on_event or no_event)("model.evaluated", subject=f"model:{model.version}",
                 details={"model": model.name, "model_version": model.version, "dataset": dataset_name,
                          "dataset_version": evaluation["dataset_version"], "split": split,
                          "external": external, "evaluation_role": role,
                          "not_external_reasons": [] if external else provenance["reasons"],
                          "dataset_version_check": (version_check or {}).get("status"),
                          "n_images": evaluation["n_images"],
                          "n_patients": evaluation["n_patients"],
                          "auroc": evaluation["covid19_vs_rest"]["auroc"]["value"]})
    return evaluation


def _load_ablations(model):
    """The ablation models saved with the version's training run (``evaluation/shortcut_models``), or None."""
    import tempfile

    from models import registry
    from models.shortcut import Ablations

    if not model.run_id:
        return None
    try:
        with tempfile.TemporaryDirectory(prefix="cxr-abl-") as tmp:
            path = registry.client().download_artifacts(model.run_id, "evaluation/shortcut_models", dst_path=tmp)
            return Ablations.load(Path(path), model.config)
    except Exception:  # noqa: BLE001 - a version trained before the battery existed (or without it)
        return None
