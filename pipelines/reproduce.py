"""Reproducing a training run from its recorded lineage (``cxr reproduce RUN_ID``).

Re-materialises the dataset version the run used (DVC), re-trains with the recorded parameters
(audited through ``pipelines.lifecycle``), and compares the metrics within a tolerance.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

REPRODUCE_METRICS = ["auroc", "sensitivity", "specificity"]

class ReproduceError(RuntimeError):
    pass

def _download_json(client, run_id: str, path: str) -> Any | None:
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = client.download_artifacts(run_id, path, tmp)
            return json.loads(Path(local).read_text())
    except Exception:  # noqa: BLE001 - artefact absent
        return None

def _metric_value(evaluation: dict | None, metric: str) -> float | None:
    if not evaluation:
        return None
    # evaluation.json nests metrics under covid19_vs_rest; train()'s summary has them at the top level
    v = (evaluation.get("covid19_vs_rest") or evaluation).get(metric)
    if isinstance(v, dict):
        v = v.get("value")
    return float(v) if isinstance(v, (int, float)) else None

def lineage_of_run(run_id: str) -> dict:
    """The lineage recorded for a training run (or a pipeline run: its training run)."""
    from pipelines.pipeline_steps import _client

    client = _client()
    try:
        run = client.get_run(run_id)
    except Exception as exc:  # noqa: BLE001
        raise ReproduceError(f"MLflow run {run_id!r} not found ({exc})") from exc
    tags = run.data.tags
    if tags.get("cxr.kind") == "pipeline":
        if not tags.get("training_run_id"):
            raise ReproduceError(f"pipeline run {run_id} has no training run (it failed before training)")
        run_id = tags["training_run_id"]
        run = client.get_run(run_id)
        tags = run.data.tags
    params = run.data.params
    lineage = _download_json(client, run_id, "lineage/lineage.json") or {}
    p = dict(lineage.get("parameters") or {})
    if not p and tags.get("lineage.parameters"):
        p = json.loads(tags["lineage.parameters"])
    for key, cast in [("epochs", int), ("image_size", int), ("encoder", str), ("batch_size", int), ("seed", int),
                      ("target_sensitivity", float), ("modalities", str), ("n_bootstrap", int)]:
        if key not in p and key in params:
            try:
                p[key] = cast(params[key])
            except ValueError:
                pass
    dataset_name = lineage.get("dataset_name") or params.get("dataset_name") or params.get("dataset") \
        or tags.get("dataset_name")
    dataset_version = lineage.get("dataset_version") or tags.get("dataset_version") or params.get("dataset_version")
    git = lineage.get("git_commit") or tags.get("git_commit") or tags.get("mlflow.source.git.commit")
    if not dataset_name or not dataset_version:
        raise ReproduceError(f"run {run_id} records no dataset name/version: cannot reproduce it")
    evaluation = _download_json(client, run_id, "evaluation/evaluation.json")
    return {"run_id": run_id, "from_pipeline": bool(lineage), "dataset_name": dataset_name,
            "dataset_version": str(dataset_version),
            "git_commit": git, "parameters": p, "seed": p.get("seed"), "evaluation": evaluation,
            "environment": lineage.get("environment") or {k[4:]: v for k, v in tags.items() if k.startswith("env.")}}

def materialize_dataset_version(name: str, md5: str) -> tuple[str, bool]:
    """Make dataset version ``md5`` of ``name`` available; returns (dataset name to train on, created?).

    When ``data/NAME`` is already at that version it is used as is. Otherwise the ``.dvc`` file of
    that version is taken from git history (``git log -- data/NAME.dvc``), written as
    ``data/NAME--vMD5.dvc`` and checked out with DVC (from the cache, else pulled from the remote).
    """
    import subprocess

    import yaml

    from core.config import get_settings
    from models.datasets import dataset_version
    from pipelines.dvc_store import DvcError, run_dvc

    if dataset_version(name).get("dataset_version") == md5 and (get_settings().data_dir / name).is_dir():
        return name, False
    root = get_settings().project_root
    alias = f"{name}--v{md5.split('.')[0][:10]}"
    doc = None
    revs = subprocess.run(["git", "log", "--format=%H", "--", f"data/{name}.dvc"], cwd=root,
                          capture_output=True, text=True)
    for rev in revs.stdout.split():
        shown = subprocess.run(["git", "show", f"{rev}:data/{name}.dvc"], cwd=root, capture_output=True, text=True)
        if shown.returncode == 0 and md5 in shown.stdout:
            doc = yaml.safe_load(shown.stdout)
            break
    if doc is None:  # not in git history (e.g. never committed): the hash alone is enough for DVC
        doc = {"outs": [{"md5": md5, "hash": "md5", "path": name}]}
    doc["outs"][0]["path"] = alias
    dvc_path = root / "data" / f"{alias}.dvc"
    dvc_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    try:
        proc = run_dvc(["checkout", "-q", "--force", f"data/{alias}.dvc"], root, check=False)
        if proc.returncode != 0:
            run_dvc(["pull", "-q", "--force", f"data/{alias}.dvc"], root)
    except DvcError as exc:
        dvc_path.unlink(missing_ok=True)
        raise ReproduceError(f"dataset {name} version {md5} is neither in the DVC cache nor the remote: {exc}") from exc
    return alias, True

def _cleanup_dataset(alias: str) -> None:
    import shutil

    from core.config import get_settings

    data = get_settings().data_dir
    shutil.rmtree(data / alias, ignore_errors=True)
    (data / f"{alias}.dvc").unlink(missing_ok=True)

def compare_metrics(recorded: dict | None, reproduced: dict | None, tolerance: float) -> tuple[list[dict], bool]:
    """Per metric: recorded, reproduced, difference, within ``tolerance``; and whether all are within."""
    rows = []
    ok = True
    for m in REPRODUCE_METRICS:
        old, new = _metric_value(recorded, m), _metric_value(reproduced, m)
        diff = None if old is None or new is None else new - old
        within = (old is None and new is None) or (diff is not None and abs(diff) <= tolerance)
        ok &= within
        rows.append({"metric": m, "recorded": old, "reproduced": new, "difference": diff, "within": within})
    return rows, ok

def reproduce_run(run_id: str, *, tolerance: float = 0.02, actor: str | None = None,
                  keep_data: bool = False) -> dict:
    """Re-train from ``run_id``'s lineage; compare metrics. Returns the comparison (``within_tolerance``)."""
    if tolerance < 0:
        raise ReproduceError("--tolerance must be ≥ 0")
    from compliance.audit import record_event
    from core.config import get_settings
    from core.identity import acting_user
    from core.lineage import git_commit
    from pipelines.lifecycle import train_and_record
    from pipelines.pipeline_steps import _client, _train_kwargs, package_versions, record_lineage_on_run

    actor = acting_user(actor)
    lin = lineage_of_run(run_id)
    dataset, created = materialize_dataset_version(lin["dataset_name"], lin["dataset_version"])
    notes = []
    # the pipeline records the code's commit; a plain `cxr train` run records the project root's
    settings_root = get_settings().project_root
    current = git_commit() if lin.get("from_pipeline") or not (settings_root / ".git").exists() \
        else git_commit(settings_root)
    if lin.get("git_commit") and current.replace("-dirty", "") != str(lin["git_commit"]).replace("-dirty", ""):
        notes.append(f"code commit differs: recorded {lin['git_commit']}, running {current} "
                     f"(check out {lin['git_commit']} for an exact re-run)")
    env_now = package_versions()
    env_diff = {k: {"recorded": v, "now": env_now.get(k)} for k, v in (lin.get("environment") or {}).items()
                if k in env_now and k not in ("platform",) and str(env_now.get(k)) != str(v)}
    if env_diff:
        notes.append(f"environment differs: {env_diff}")
    try:
        p = dict(lin["parameters"], actor=actor)
        kwargs = _train_kwargs(p)
        result = train_and_record(dataset, **kwargs)
    finally:
        if created and not keep_data:
            _cleanup_dataset(dataset)
    client = _client()
    new_eval = result.get("evaluation") or _download_json(client, result["run_id"], "evaluation/evaluation.json")
    rows, ok = compare_metrics(lin["evaluation"], new_eval, tolerance)
    lineage = {"reproduction_of": lin["run_id"], "dataset_name": lin["dataset_name"],
               "dataset_version": lin["dataset_version"], "git_commit": current,
               "parameters": lin["parameters"], "seed": lin.get("seed"), "environment": env_now}
    record_lineage_on_run(client, result["run_id"], lineage)
    client.set_tag(result["run_id"], "reproduction_of", lin["run_id"])
    out = {"run_id": lin["run_id"], "reproduced_run_id": result["run_id"],
           "reproduced_model_version": str(result.get("model_version")), "dataset_name": lin["dataset_name"],
           "dataset_version": lin["dataset_version"], "trained_on": dataset,
           "reproduced_dataset_version": result.get("dataset_version"), "parameters": lin["parameters"],
           "tolerance": tolerance, "metrics": rows, "within_tolerance": ok, "notes": notes}
    from pipelines.pipeline_steps import log_json

    log_json(client, result["run_id"], out, "reproduction/reproduction.json")
    record_event("pipeline.run", actor=actor, role="researcher", subject=f"run:{lin['run_id']}",
                 details={"kind": "reproduce", "reproduced_run_id": result["run_id"],
                          "dataset_version": lin["dataset_version"], "within_tolerance": ok, "tolerance": tolerance,
                          "metrics": {r["metric"]: r["difference"] for r in rows}})
    return out
