"""Helpers for governance tests: real MLflow model versions (SQLite store under CXR_HOME), no training.

A version is a real run with a tiny artefact as "model", an ``evaluation/evaluation.json`` artefact
and the registry tags training writes (dataset_version, git_commit, status, trained_by, registered_by).
"""
from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path
from typing import Any


def _metric(value: float, lo: float, hi: float) -> dict[str, float]:
    return {"value": value, "ci_low": lo, "ci_high": hi}


GOOD_EVALUATION: dict[str, Any] = {
    "dataset_version": "ds-md5-good",
    "model_version": None,
    "n_patients": 40,
    "n_images": 52,
    "covid19_vs_rest": {
        "auroc": _metric(0.91, 0.84, 0.96),
        "sensitivity": _metric(0.86, 0.74, 0.94),
        "specificity": _metric(0.82, 0.70, 0.90),
        "ppv": _metric(0.80, 0.67, 0.89),
        "npv": _metric(0.88, 0.77, 0.95),
        "threshold": 0.42,
    },
    "n_patients_covid19": 18,
    "n_patients_not_covid19": 22,
    "interval_method": "95% CI: proportions Clopper-Pearson exact with patient design effect; AUROC Newcombe",
    "calibration": {"ece_before": 0.11, "ece_after": 0.05, "temperature": 1.3,
                    "covid19": {"ece": _metric(0.06, 0.03, 0.12), "slope": _metric(0.95, 0.7, 1.2),
                                "intercept": _metric(0.1, -0.3, 0.5)}},
    "subgroups": {  # the model side's layout (models/evaluate.py): point estimates + flags
        "sex": {"F": {"n_images": 26, "n_patients": 20, "n_covid19": 9, "auroc": 0.90, "sensitivity": 0.85,
                      "specificity": 0.80, "small": True, "note": "small group (n=26 < 30): interpret with caution"},
                "M": {"n_images": 26, "n_patients": 20, "n_covid19": 10, "auroc": 0.92, "sensitivity": 0.87,
                      "specificity": 0.84, "small": True, "note": "small group (n=26 < 30): interpret with caution"}},
        "site": {"site-a": {"n_images": 52, "n_patients": 40, "n_covid19": 19, "auroc": 0.91, "sensitivity": 0.86,
                            "specificity": 0.82, "small": False, "note": ""}},
    },
    "external": {
        "synthetic-site-b": {
            "n_patients": 30, "n_images": 30,
            "covid19_vs_rest": {"auroc": _metric(0.85, 0.76, 0.93), "sensitivity": _metric(0.8, 0.66, 0.9)},
            "provenance": {"is_external": True, "reasons": []},  # policy 2.0.0 counts verified ones only
        }
    },
    # the shortcut battery (issue 14, policy 1.1.0): beats vitals-only and missingness-only, blind without lungs
    "shortcut": {
        "n_images": 52, "n_covid19": 19, "n_other": 33, "model": _metric(0.91, 0.84, 0.96),
        "ablations": {"image_only": {"auroc": _metric(0.88, 0.79, 0.95)},
                      "vitals_only": {"auroc": _metric(0.70, 0.56, 0.83)},
                      "missingness_only": {"auroc": _metric(0.52, 0.40, 0.64)}},
        "fusion_minus_vitals_only": _metric(0.21, 0.09, 0.33),
        "fusion_minus_missingness_only": _metric(0.39, 0.25, 0.53),
        "masked_lungs": {"auroc": _metric(0.53, 0.38, 0.66)},
        "lungs_only": {"auroc": _metric(0.86, 0.76, 0.94)},
    },
}


def failing_evaluation() -> dict[str, Any]:
    """Fails sensitivity lower bound, minimum patients and external validation (absent)."""
    ev = copy.deepcopy(GOOD_EVALUATION)
    ev["covid19_vs_rest"]["sensitivity"] = _metric(0.62, 0.41, 0.80)
    ev["n_patients"] = 12
    ev.pop("external")
    return ev


_TEMPLATE_DB: Path | None = None


def ensure_mlflow_db() -> None:
    """Give this test's CXR_HOME an MLflow SQLite store: a copy of one migrated empty store made once
    per test process (creating a store runs MLflow's ~50 schema migrations: seconds each time)."""
    global _TEMPLATE_DB
    from core.config import get_settings

    s = get_settings()
    target = s.state_dir / "mlflow.db"
    if not s.tracking_uri.startswith("sqlite:///") or target.exists():
        return
    if _TEMPLATE_DB is None or not _TEMPLATE_DB.exists():
        from mlflow import MlflowClient

        template = Path(tempfile.mkdtemp(prefix="cxr-mlflow-template-")) / "mlflow.db"
        MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
        _TEMPLATE_DB = template
    shutil.copyfile(_TEMPLATE_DB, target)


def make_version(evaluation: dict[str, Any] | None, *, trained_by: str = "rita", registered_by: str | None = None,
                 dataset_version: str = "ds-md5-good", git_commit: str = "0123abcd", params: dict | None = None,
                 external_artifacts: dict[str, dict] | None = None) -> str:
    """Register a new ``covid-cxr`` version (status candidate); returns its version number."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from core.config import get_settings

    ensure_mlflow_db()
    s = get_settings()
    c = MlflowClient(tracking_uri=s.tracking_uri, registry_uri=s.tracking_uri)
    exp = c.get_experiment_by_name("governance-tests")
    exp_id = exp.experiment_id if exp else c.create_experiment(
        "governance-tests", artifact_location=s.mlflow_artifact_root.as_uri())
    run = c.create_run(exp_id, tags={"mlflow.user": trained_by})
    rid = run.info.run_id
    for k, v in (params or {"epochs": 2, "encoder": "small", "image_size": 64}).items():
        c.log_param(rid, k, v)
    c.log_text(rid, "tiny model weights placeholder", "model/weights.txt")
    if evaluation is not None:
        c.log_dict(rid, evaluation, "evaluation/evaluation.json")
    for name, ev in (external_artifacts or {}).items():  # what `cxr evaluate` on another dataset logs
        c.log_dict(rid, ev, f"evaluation/external/{name}.json")
    c.set_terminated(rid)
    try:
        c.create_registered_model(s.registered_model_name)
    except MlflowException:
        pass
    mv = c.create_model_version(s.registered_model_name, source=f"{run.info.artifact_uri}/model", run_id=rid,
                                tags={"dataset_version": dataset_version, "git_commit": git_commit, "status": "candidate",
                                      "trained_by": trained_by, "registered_by": registered_by or trained_by})
    return str(mv.version)


def mlflow_client():
    from mlflow import MlflowClient

    from core.config import get_settings

    ensure_mlflow_db()
    s = get_settings()
    return MlflowClient(tracking_uri=s.tracking_uri, registry_uri=s.tracking_uri)
