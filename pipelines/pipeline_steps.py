"""The bodies of the training pipeline's components (see ``pipelines/kfp_pipeline.py``).

Kept apart from the kfp graph on purpose: inside a running component kfp sets ``_KFP_RUNTIME`` and
its ``kfp.dsl`` is import-restricted (``kfp.compiler`` cannot be imported there), so the code a
component runs must not import the pipeline definition. Each ``step_*`` takes and returns the run
*state*, a small JSON string, and writes its artefacts to MLflow.
"""
from __future__ import annotations

import json
import os
import platform
import time
import traceback
from pathlib import Path
from typing import Any

PIPELINE_NAME = "covid-cxr-training"
PIPELINE_EXPERIMENT = "covid-cxr-pipelines"
ENV_PACKAGES = ["torch", "monai", "mlflow", "dvc", "kfp", "numpy", "pydicom", "pandas", "scikit-learn", "covid-cxr"]
REQUIRED_COLUMNS = ["image_hash", "patient_id", "split", "label", "view", "site", "source", "variant",
                    "array_path"]
CLASSES = ["covid19", "other_pneumonia", "normal"]


# --------------------------------------------------------------------------------------------
# Helpers shared by the steps
# --------------------------------------------------------------------------------------------
def package_versions() -> dict[str, str]:
    """Versions of the packages a result depends on, plus Python and the platform."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ENV_PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not-installed"
    try:
        import torch

        out["cuda_available"] = str(torch.cuda.is_available())
        out["torch_cuda"] = str(torch.version.cuda)
    except Exception:  # pragma: no cover - torch is a hard dependency
        pass
    return out


def _client():
    from models.registry import client, configure_mlflow

    configure_mlflow()
    return client()


def _pipeline_experiment_id(client) -> str:
    from core.config import get_settings

    exp = client.get_experiment_by_name(PIPELINE_EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    location = (get_settings().mlflow_artifact_root / "pipelines").resolve()
    location.mkdir(parents=True, exist_ok=True)
    try:
        return client.create_experiment(PIPELINE_EXPERIMENT, artifact_location=location.as_uri())
    except Exception:  # created concurrently
        return client.get_experiment_by_name(PIPELINE_EXPERIMENT).experiment_id


def log_json(client, run_id: str, obj: Any, artifact_path: str) -> None:
    """Log ``obj`` as JSON at ``artifact_path`` (e.g. ``comparison/comparison.json``) in ``run_id``."""
    import tempfile

    folder, name = os.path.split(artifact_path)
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / name
        p.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default))
        client.log_artifact(run_id, str(p), artifact_path=folder or None)


def log_text(client, run_id: str, text: str, artifact_path: str) -> None:
    import tempfile

    folder, name = os.path.split(artifact_path)
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / name
        p.write_text(text)
        client.log_artifact(run_id, str(p), artifact_path=folder or None)


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "as_dict"):
        return o.as_dict()
    if hasattr(o, "__dict__"):
        return {k: v for k, v in vars(o).items() if not k.startswith("_")}
    return str(o)


def _dumps(state: dict) -> str:
    return json.dumps(state, sort_keys=True, default=_json_default)


from pipelines.dvc_store import ensure_dataset_present  # noqa: E402,F401 - a step helper, kept importable here


def _audit(action: str, *, actor: str, subject: str, details: dict, role: str | None = None) -> None:
    from compliance.audit import record_event
    from pipelines.lifecycle import actor_role

    role = role or actor_role(actor)
    record_event(action, actor=actor, role=role, subject=subject,
                 details=json.loads(json.dumps(details, default=_json_default)))


def _model_subject(version: str) -> str:
    from core.config import get_settings

    return f"model/{get_settings().registered_model_name}/{version}"


def _fail(state: dict, step: str, exc: BaseException) -> None:
    """Mark the pipeline's MLflow run failed and audit the failure; the caller re-raises."""
    try:
        client = _client()
        run_id = state.get("pipeline_run_id")
        if run_id:
            client.set_tag(run_id, "cxr.failed_step", step)
            client.set_tag(run_id, "cxr.error", str(exc)[:4000])
            log_text(client, run_id, "".join(traceback.format_exception(exc)), f"errors/{step}.txt")
            client.set_terminated(run_id, "FAILED")
        _audit("pipeline.run", actor=state.get("params", {}).get("actor", "pipeline"),
               subject=f"pipeline:{run_id or 'unstarted'}",
               details={"status": "failed", "step": step, "error": str(exc)[:500],
                        "dataset": state.get("dataset_name"), "dataset_version": state.get("dataset_version")})
    except Exception:  # never mask the original error
        pass


# --------------------------------------------------------------------------------------------
# Steps (the component bodies)
# --------------------------------------------------------------------------------------------
def validate_manifest(manifest, dataset_root: Path, *, min_train: int, min_val: int, min_test: int,
                      min_class_fraction: float) -> dict:
    """Schema, split sizes, label balance, patient leakage and cached arrays. Returns a report."""
    problems: list[str] = []
    missing = [c for c in REQUIRED_COLUMNS if c not in manifest.columns]
    if missing:
        problems.append(f"manifest lacks required columns {missing}")
        return {"ok": False, "problems": problems}
    labelled = manifest[manifest["label"].isin(CLASSES)]
    bad_labels = sorted(set(manifest["label"]) - set(CLASSES) - {"unlabeled"})
    if bad_labels:
        problems.append(f"unknown labels {bad_labels} (expected {CLASSES} or 'unlabeled')")
    splits = {s: int((labelled["split"] == s).sum()) for s in ["train", "val", "test"]}
    for split, minimum in [("train", min_train), ("val", min_val), ("test", min_test)]:
        if splits[split] < minimum:
            problems.append(f"split '{split}' has {splits[split]} labelled images; at least {minimum} required")
    counts = {split: {c: int(((labelled["split"] == split) & (labelled["label"] == c)).sum()) for c in CLASSES}
              for split in ["train", "val", "test"]}
    train_n = max(splits["train"], 1)
    fractions = {c: counts["train"][c] / train_n for c in CLASSES}
    for c, f in fractions.items():
        if f < min_class_fraction:
            problems.append(f"class '{c}' is {f:.1%} of the train split; at least {min_class_fraction:.0%} required")
    if counts["test"]["covid19"] == 0:
        problems.append("the test split has no covid19 images: sensitivity cannot be estimated")
    per_patient = labelled.groupby("patient_id")["split"].nunique()
    leaking = int((per_patient > 1).sum())
    if leaking:
        problems.append(f"{leaking} patients appear in more than one split (split must be by patient)")
    absent = [p for p in manifest["array_path"] if not (dataset_root / str(p)).exists()]
    if absent:
        problems.append(f"{len(absent)} cached arrays missing (first: {absent[0]})")
    variants = sorted({str(v) for v in manifest["variant"].fillna("")})
    return {"ok": not problems, "problems": problems, "n_images": int(len(manifest)),
            "n_labelled": int(len(labelled)), "n_patients": int(manifest["patient_id"].nunique()),
            "split_sizes": splits, "label_counts": counts, "train_class_fractions": fractions,
            "variants": variants}


def _dvc_hash_present(name: str, version: dict) -> list[str]:
    """The DVC hash is recorded (``data/NAME.dvc``) and its object is in the cache or the local remote."""
    from core.config import get_settings

    s = get_settings()
    problems = []
    md5 = str(version.get("dvc_md5") or version.get("dataset_version") or "")
    if not md5 or md5 in {"unknown", "none", "None"}:
        return [f"dataset '{name}' has no DVC hash: import it with `cxr data import` (DVC-tracks it)"]
    dvc_file = s.data_dir / f"{name}.dvc"
    if not dvc_file.exists():
        problems.append(f"{dvc_file} not found: the dataset is not DVC-tracked")
    elif md5.split(".")[0] not in dvc_file.read_text():
        problems.append(f"{dvc_file} does not record hash {md5}")
    h = md5 if md5.endswith(".dir") else md5
    stores = [s.project_root / ".dvc" / "cache" / "files" / "md5", s.dvc_remote_dir / "files" / "md5"]
    found = any((store / h[:2] / h[2:]).exists() or (store / h[:2] / (h[2:] + ".dir")).exists() for store in stores)
    if not found:
        problems.append(f"DVC object {md5} not in the cache or the remote ({stores[1]})")
    return problems


def step_validate(dataset_name: str, external_datasets: str, params: str) -> str:
    from core.config import get_settings
    from core.lineage import git_commit
    from models.datasets import load_dataset

    p = json.loads(params)
    externals = json.loads(external_datasets or "[]")
    if isinstance(externals, str):
        externals = [externals]
    state: dict[str, Any] = {"dataset_name": dataset_name, "external_datasets": externals, "params": p,
                             "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        settings = get_settings()
        client = _client()
        exp_id = _pipeline_experiment_id(client)
        run = client.create_run(exp_id, run_name=f"pipeline-{dataset_name}-{int(time.time())}",
                                tags={"cxr.kind": "pipeline", "cxr.pipeline": PIPELINE_NAME,
                                      "cxr.dataset": dataset_name, "mlflow.user": p.get("actor", "pipeline")})
        run_id = run.info.run_id
        state["pipeline_run_id"] = run_id
        for k, v in sorted(p.items()):
            client.log_param(run_id, k, v)
        client.log_param(run_id, "dataset_name", dataset_name)
        client.log_param(run_id, "external_datasets", json.dumps(externals))

        reports = {}
        problems: list[str] = []
        versions = {}
        for i, name in enumerate([dataset_name, *externals]):
            try:
                ensure_dataset_present(name)
                ds = load_dataset(name)
            except Exception as exc:  # noqa: BLE001 - reported as a validation problem
                problems.append(f"dataset '{name}' cannot be loaded: {exc}")
                continue
            versions[name] = dict(ds.version)
            problems += [f"{name}: {m}" for m in _dvc_hash_present(name, ds.version)]
            if i == 0:
                rep = validate_manifest(ds.manifest, Path(ds.root), min_train=p["min_train"], min_val=p["min_val"],
                                        min_test=p["min_test"], min_class_fraction=p["min_class_fraction"])
            else:  # external sets are evaluated only: schema + arrays + some labelled covid19 images
                rep = validate_manifest(ds.manifest, Path(ds.root), min_train=0, min_val=0, min_test=0,
                                        min_class_fraction=0.0)
                rep["problems"] = [m for m in rep["problems"] if "test split has no covid19" not in m]
                if not (ds.manifest["label"] == "covid19").any():
                    rep["problems"].append("no labelled covid19 images")
                rep["ok"] = not rep["problems"]
            reports[name] = rep
            problems += [f"{name}: {m}" for m in rep["problems"]]
        main_version = versions.get(dataset_name, {})
        lineage = {
            "pipeline": PIPELINE_NAME,
            "pipeline_run_id": run_id,
            "dataset_name": dataset_name,
            "dataset_version": main_version.get("dataset_version"),
            "dvc_md5": main_version.get("dvc_md5"),
            "dataset_git_commit": main_version.get("git_commit"),
            "external_datasets": {n: versions.get(n, {}).get("dataset_version") for n in externals},
            "git_commit": git_commit(),
            "project_git_commit": git_commit(settings.project_root),
            "parameters": p,
            "seed": p.get("seed"),
            "environment": package_versions(),
            "actor": p.get("actor"),
        }
        state["dataset_version"] = main_version.get("dataset_version")
        state["dataset_versions"] = versions
        state["lineage"] = lineage
        client.set_tag(run_id, "dataset_version", str(lineage["dataset_version"]))
        client.set_tag(run_id, "git_commit", lineage["git_commit"])
        client.set_tag(run_id, "seed", str(lineage["seed"]))
        for k, v in lineage["environment"].items():
            client.set_tag(run_id, f"env.{k}", v)
        log_json(client, run_id, {"ok": not problems, "problems": problems, "datasets": reports},
                 "validation/validation.json")
        log_json(client, run_id, lineage, "lineage/lineage.json")
        state["validation"] = {"ok": not problems, "problems": problems,
                               "split_sizes": reports.get(dataset_name, {}).get("split_sizes"),
                               "variants": reports.get(dataset_name, {}).get("variants")}
        if problems:
            raise ValueError("dataset validation failed:\n  - " + "\n  - ".join(problems))
        return _dumps(state)
    except BaseException as exc:
        _fail(state, "validate", exc)
        raise


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _train_kwargs(p: dict) -> dict:
    """Keyword arguments for ``models.train.train`` that it accepts (it is the model owner's function)."""
    import inspect

    from models.train import train

    wanted = {"epochs": p.get("epochs"), "image_size": p.get("image_size"), "device": p.get("device") or _device(),
              "seed": p.get("seed"), "encoder": p.get("encoder"), "batch_size": p.get("batch_size"),
              "target_sensitivity": p.get("target_sensitivity"), "actor": p.get("actor"),
              "n_bootstrap": p.get("n_bootstrap")}
    if p.get("modalities"):
        wanted["modalities"] = p["modalities"]
    sig = inspect.signature(train)
    accepts_any = any(x.kind is inspect.Parameter.VAR_KEYWORD for x in sig.parameters.values())
    return {k: v for k, v in wanted.items() if v is not None and (accepts_any or k in sig.parameters)}


def record_lineage_on_run(client, run_id: str, lineage: dict) -> None:
    """Lineage as tags (``lineage.*``, ``env.*``) and ``lineage/lineage.json`` on a training run."""
    tags = {
        "lineage.pipeline_run_id": str(lineage.get("pipeline_run_id", "")),
        "lineage.dataset_name": str(lineage.get("dataset_name", "")),
        "lineage.dataset_version": str(lineage.get("dataset_version", "")),
        "lineage.git_commit": str(lineage.get("git_commit", "")),
        "lineage.seed": str(lineage.get("seed", "")),
        "lineage.parameters": json.dumps(lineage.get("parameters", {}), sort_keys=True),
    }
    for k, v in (lineage.get("environment") or {}).items():
        tags[f"env.{k}"] = str(v)
    for k, v in tags.items():
        client.set_tag(run_id, k, v[:5000])
    log_json(client, run_id, lineage, "lineage/lineage.json")


def step_train(state_json: str) -> str:
    from pipelines.lifecycle import train_and_record

    state = json.loads(state_json)
    p = state["params"]
    try:
        client = _client()
        ensure_dataset_present(state["dataset_name"])
        kwargs = _train_kwargs(p)
        state["train_kwargs"] = kwargs
        if p.get("train_launcher", "inprocess") == "trainjob":  # cluster: Kubeflow Trainer TrainJob (DDP)
            from pipelines.trainjob import run_train_job

            kwargs["device"] = "cuda" if int(p.get("gpus_per_node", 1)) else "cpu"
            client.set_tag(state["pipeline_run_id"], "device", f"{p.get('train_nodes', 1)}x{kwargs['device']}")
            result = run_train_job(state["dataset_name"], kwargs, nodes=int(p.get("train_nodes", 1)),
                                   gpus_per_node=int(p.get("gpus_per_node", 1)), image=p["train_image"])
        else:
            client.set_tag(state["pipeline_run_id"], "device", kwargs.get("device", "cpu"))
            result = train_and_record(state["dataset_name"], **kwargs)
        result = json.loads(json.dumps(result, default=_json_default))
        version = str(result["model_version"])
        state["model_version"] = version
        state["training_run_id"] = result["run_id"]
        state["training_evaluation"] = {m: (result.get("evaluation") or {}).get(m)
                                        for m in ("auroc", "sensitivity", "specificity", "threshold", "n_patients")}
        if result.get("dataset_version") and state.get("dataset_version") and \
                str(result["dataset_version"]) != str(state["dataset_version"]):
            raise RuntimeError(f"trained on dataset version {result['dataset_version']} but validated "
                               f"{state['dataset_version']}: the dataset changed during the run")
        lineage = dict(state["lineage"], training_run_id=result["run_id"], model_version=version,
                       device=kwargs.get("device"))
        state["lineage"] = lineage
        record_lineage_on_run(client, result["run_id"], lineage)
        run_id = state["pipeline_run_id"]
        client.set_tag(run_id, "training_run_id", result["run_id"])
        client.set_tag(run_id, "model_version", version)
        from core.config import get_settings

        name = get_settings().registered_model_name
        client.set_model_version_tag(name, version, "pipeline_run_id", run_id)
        client.set_model_version_tag(name, version, "seed", str(p.get("seed")))
        log_json(client, run_id, lineage, "lineage/lineage.json")
        return _dumps(state)
    except BaseException as exc:
        _fail(state, "train", exc)
        raise


def _evaluate_version(version: str, dataset: str, *, split: str | None, seed: int, n_bootstrap: int,
                      actor: str, internal: bool) -> dict:
    """``models.validation.evaluate_model_version`` for one (version, dataset), audited.

    External sets are logged on the version's run by models.validation (``evaluation/external/...``,
    which the release policy reads); the internal test split was already logged by training.
    """
    from pipelines.lifecycle import evaluate_and_record

    return evaluate_and_record(version, dataset, split=split, seed=seed, n_bootstrap=n_bootstrap, actor=actor,
                               log_to_mlflow=not internal)


def _test_sets(state: dict) -> list[tuple[str, str | None]]:
    """(dataset, split): the training dataset's test split, then every external dataset whole."""
    return [(state["dataset_name"], "test")] + [(n, None) for n in state["external_datasets"]]


def step_evaluate(state_json: str) -> str:
    state = json.loads(state_json)
    p = state["params"]
    try:
        client = _client()
        run_id = state["pipeline_run_id"]
        version = state["model_version"]
        evaluations: dict[str, Any] = {}
        summary: dict[str, Any] = {}
        test_sets = _test_sets(state)
        for name, split in test_sets:
            key = name if split is None else f"{name}:{split}"
            ensure_dataset_present(name)
            evaluation = _evaluate_version(version, name, split=split, seed=p["seed"],
                                           n_bootstrap=p["n_bootstrap"], actor=p.get("actor", "pipeline"),
                                           internal=split is not None)
            evaluation = json.loads(json.dumps(evaluation, default=_json_default))
            evaluations[key] = evaluation
            cvr = evaluation.get("covid19_vs_rest", {})
            summary[key] = {m: cvr.get(m) for m in ["auroc", "sensitivity", "specificity", "ppv", "npv"]}
            log_json(client, run_id, evaluation, f"evaluation/{key.replace(':', '__')}.json")
            safe = key.replace(":", "_")
            for m in ["auroc", "sensitivity", "specificity"]:
                v = (cvr.get(m) or {}).get("value") if isinstance(cvr.get(m), dict) else cvr.get(m)
                if isinstance(v, (int, float)):
                    client.log_metric(run_id, f"{safe}.{m}", float(v))
        log_json(client, state["training_run_id"], evaluations, "pipeline/evaluations.json")
        state["evaluation_summary"] = summary
        return _dumps(state)
    except BaseException as exc:
        _fail(state, "evaluate", exc)
        raise


def step_compare(state_json: str) -> str:
    from pipelines.variant import compare_champion_challenger, report_markdown

    state = json.loads(state_json)
    p = state["params"]
    try:
        client = _client()
        run_id = state["pipeline_run_id"]
        test_sets = _test_sets(state)
        for name, _ in test_sets:
            ensure_dataset_present(name)
        report = compare_champion_challenger(state["model_version"], test_sets, champion="champion",
                                             n_bootstrap=p["n_bootstrap"], seed=p["seed"])
        report["pipeline_run_id"] = run_id
        md = report_markdown(report)
        for rid in [run_id, state["training_run_id"]]:
            log_json(client, rid, report, "comparison/comparison.json")
            log_text(client, rid, md, "comparison/comparison.md")
        state["comparison"] = {"champion_version": report.get("champion_version"),
                               "headline": report.get("headline")}
        client.set_tag(run_id, "champion_version", str(report.get("champion_version")))
        return _dumps(state)
    except BaseException as exc:
        _fail(state, "compare", exc)
        raise


def step_register(state_json: str) -> str:
    from core.config import get_settings

    state = json.loads(state_json)
    p = state["params"]
    try:
        client = _client()
        name = get_settings().registered_model_name
        version = state["model_version"]
        mv = client.get_model_version(name, version)
        status = (mv.tags or {}).get("status")
        if status not in (None, "", "candidate"):
            raise RuntimeError(f"model version {version} has status {status!r}; a pipeline registers candidates only")
        client.set_model_version_tag(name, version, "status", "candidate")
        client.set_model_version_tag(name, version, "comparison_run_id", state["pipeline_run_id"])
        actor = p.get("actor", "pipeline")
        # governance's alias mover audits ``alias.changed`` (MLflow keeps no alias history)
        from compliance.registry_access import move_alias
        from pipelines.lifecycle import actor_role

        previous = move_alias("challenger", version, actor=actor, role=actor_role(actor),
                              reason=f"pipeline run {state['pipeline_run_id']}", cause="pipeline.run")
        state["registered"] = {"model": name, "version": version, "status": "candidate", "alias": "challenger",
                               "previous_challenger": previous}
        client.set_tag(state["pipeline_run_id"], "registered_version", version)
        return _dumps(state)
    except BaseException as exc:
        _fail(state, "register", exc)
        raise


def step_policy(state_json: str) -> str:
    state = json.loads(state_json)
    p = state["params"]
    try:
        client = _client()
        run_id = state["pipeline_run_id"]
        version = state["model_version"]
        try:
            from compliance.policy import check_release_policy

            result = check_release_policy(version, actor=p.get("actor"))
            result = json.loads(json.dumps(result, default=_json_default))
        except ImportError as exc:
            result = {"passed": None, "error": f"compliance.policy unavailable: {exc}"}
        passed = None
        if isinstance(result, dict):
            passed = result.get("passed", result.get("ok"))
        log_json(client, run_id, result, "policy/policy.json")
        state["policy"] = {k: result.get(k) for k in ("passed", "policy_version", "failed_criteria", "error")} \
            if isinstance(result, dict) else result
        state["policy_passed"] = passed
        client.set_tag(run_id, "policy_passed", str(passed))
        state["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        state["next_step"] = (f"human review: `cxr model approve {version} --reason ... --as APPROVER` "
                              "(the pipeline never approves)")
        log_json(client, run_id, state, "pipeline/state.json")
        client.set_terminated(run_id, "FINISHED")
        _audit("pipeline.run", actor=p.get("actor", "pipeline"), subject=_model_subject(version),
               details={"status": "finished", "pipeline": PIPELINE_NAME, "pipeline_run_id": run_id,
                        "training_run_id": state["training_run_id"], "model_version": version,
                        "dataset": state["dataset_name"], "dataset_version": state["dataset_version"],
                        "external_datasets": state["external_datasets"],
                        "git_commit": state["lineage"]["git_commit"], "seed": p.get("seed"),
                        "champion_version": state.get("comparison", {}).get("champion_version"),
                        "policy_passed": passed, "alias": "challenger", "status_tag": "candidate"})
        return _dumps(state)
    except BaseException as exc:
        _fail(state, "policy", exc)
        raise


