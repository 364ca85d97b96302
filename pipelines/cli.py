"""``cxr pipeline compile | run --local | submit --host URL`` and ``cxr reproduce RUN_ID``.

* ``compile`` writes the Kubeflow Pipelines v2 IR YAML (default: the committed
  ``pipelines/compiled/covid_cxr_training.yaml``).
* ``run --local`` runs the same graph with kfp's local ``SubprocessRunner(use_venv=False)``: every
  component runs in this interpreter's environment, offline, and everything lands in MLflow.
* ``submit --host URL`` sends the compiled pipeline to a Kubeflow Pipelines endpoint with
  ``kfp.Client``. The cluster pulls the image ``covid-cxr:latest`` (build it from the repository's
  ``Dockerfile`` and push it to the cluster's registry); components install nothing at run time.
* ``reproduce RUN_ID`` re-runs training from a run's recorded lineage and compares the metrics.

Heavy imports (kfp, mlflow, torch) happen inside the commands.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Optional

import typer

pipeline_app = typer.Typer(help="Kubeflow pipeline: compile, run locally, submit to a cluster.",
                           no_args_is_help=True)

REPRODUCE_METRICS = ["auroc", "sensitivity", "specificity"]


def _console():
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


def _die(message: str, code: int = 1) -> None:
    _console().print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


# --------------------------------------------------------------------------------------------
# compile
# --------------------------------------------------------------------------------------------
@pipeline_app.command("compile")
def compile_cmd(out: Optional[Path] = typer.Option(None, "--out", "-o",
                                                   help="Output YAML (default: pipelines/compiled/covid_cxr_training.yaml)")) -> None:
    """Compile the pipeline to Kubeflow Pipelines v2 IR YAML (deterministic)."""
    from pipelines.kfp_pipeline import COMPILED_YAML, compile_pipeline

    path = compile_pipeline(out or COMPILED_YAML)
    typer.echo(str(path))


# --------------------------------------------------------------------------------------------
# run --local
# --------------------------------------------------------------------------------------------
@pipeline_app.command("run")
def run_cmd(
    local: bool = typer.Option(False, "--local", help="Run with kfp's local runner in this environment (offline)."),
    dataset: str = typer.Option("cohort", "--dataset", help="Training dataset (data/NAME)."),
    external: list[str] = typer.Option([], "--external", help="External test dataset (repeatable)."),
    epochs: int = typer.Option(2, "--epochs"),
    image_size: int = typer.Option(64, "--image-size"),
    encoder: str = typer.Option("small", "--encoder", help="small | densenet121"),
    batch_size: int = typer.Option(8, "--batch-size"),
    seed: int = typer.Option(42, "--seed"),
    target_sensitivity: float = typer.Option(0.9, "--target-sensitivity"),
    n_bootstrap: int = typer.Option(500, "--bootstrap", help="Bootstrap resamples for the comparison CIs."),
    min_train: int = typer.Option(10, "--min-train", help="Validation: minimum labelled train images."),
    min_test: int = typer.Option(4, "--min-test", help="Validation: minimum labelled test images."),
    as_user: Optional[str] = typer.Option(None, "--as", help="Acting user (else CXR_USER, else OS user)."),
    as_json: bool = typer.Option(False, "--json", help="Print the final pipeline state as JSON."),
) -> None:
    """Run the training pipeline: validate → train → evaluate → compare → register challenger → policy."""
    if not local:
        _die("only --local runs here; to run on a Kubeflow cluster use `cxr pipeline submit --host URL`", 2)
    from app.config import acting_user

    actor = acting_user(as_user)
    try:
        import contextlib
        import sys

        from pipelines.kfp_pipeline import run_local

        # task logs go to stderr, so stdout carries only the result (``--json`` stays parseable)
        with contextlib.redirect_stdout(sys.stderr):
            state = run_local(dataset_name=dataset, external_datasets=external, epochs=epochs,
                              image_size=image_size,
                              encoder=encoder, batch_size=batch_size, seed=seed,
                              target_sensitivity=target_sensitivity, actor=actor, n_bootstrap=n_bootstrap,
                              min_train=min_train, min_test=min_test)
    except Exception as exc:  # noqa: BLE001 - a failed task: say which, no traceback
        import re

        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip() or repr(exc)
        detail = _last_pipeline_error()
        _die(f"pipeline run failed: {text}" + (f"\n{detail}" if detail else "")
             + "\n(the failing task's log is printed above; its MLflow pipeline run is marked FAILED)")
        return
    if as_json:
        typer.echo(json.dumps(state, indent=2, sort_keys=True, default=str))
        return
    _print_summary(state)


def _last_pipeline_error() -> str | None:
    """The error the most recent pipeline run recorded (``cxr.error`` tag), if it failed."""
    try:
        from pipelines.pipeline_steps import PIPELINE_EXPERIMENT, _client

        client = _client()
        exp = client.get_experiment_by_name(PIPELINE_EXPERIMENT)
        if exp is None:
            return None
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
        if runs and runs[0].info.status == "FAILED":
            tags = runs[0].data.tags
            return f"step '{tags.get('cxr.failed_step')}': {tags.get('cxr.error')}"
    except Exception:  # noqa: BLE001 - best effort
        return None
    return None


def _print_summary(state: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(f"[bold]pipeline run[/] {state.get('pipeline_run_id')}  dataset {state.get('dataset_name')} "
              f"version {state.get('dataset_version')}")
    con.print(f"registered model version [bold]{state.get('model_version')}[/] (status candidate, alias challenger); "
              f"training run {state.get('training_run_id')}")
    headline = (state.get("comparison") or {}).get("headline") or {}
    if headline:
        champ = state["comparison"].get("champion_version")
        t = Table(title=f"sensitivity (COVID-19) — {'champion v' + str(champ) if champ else 'no champion yet'} "
                        f"vs challenger v{state.get('model_version')}")
        for col in ["test set / group", "champion", "challenger", "difference"]:
            t.add_column(col)
        for k, v in headline.items():
            t.add_row(k, *[_fmt(v.get(c)) for c in ("champion", "challenger", "difference")])
        con.print(t)
    con.print("comparison, evaluations, lineage, policy: MLflow experiment 'covid-cxr-pipelines', "
              f"run {state.get('pipeline_run_id')} (comparison/comparison.md)")
    con.print(f"policy check passed: {state.get('policy_passed')}")
    con.print(f"next: {state.get('next_step')}")


def _fmt(d: Any) -> str:
    if not isinstance(d, dict) or d.get("value") is None:
        return "n/a"
    if d.get("ci_low") is None:
        return f"{d['value']:.2f}"
    return f"{d['value']:.2f} ({d['ci_low']:.2f}–{d['ci_high']:.2f})"


# --------------------------------------------------------------------------------------------
# submit --host
# --------------------------------------------------------------------------------------------
class SubmitError(RuntimeError):
    pass


def with_image(package: Path, image: str, out: Path) -> Path:
    """A copy of a compiled pipeline whose tasks all run ``image`` (e.g. ``registry.example/covid-cxr:0.1.0-gpu``)."""
    import yaml

    spec = yaml.safe_load(Path(package).read_text())
    for executor in spec["deploymentSpec"]["executors"].values():
        executor["container"]["image"] = image
    out.write_text(yaml.safe_dump(spec, sort_keys=True))
    return out


def submit_pipeline(host: str, *, experiment: str, arguments: dict, run_name: str | None = None,
                    package: Path | None = None, namespace: str | None = None, timeout: float = 5.0,
                    image: str | None = None) -> dict:
    """Submit the (freshly compiled) pipeline to a Kubeflow Pipelines endpoint. Raises SubmitError."""
    import httpx

    host = host.rstrip("/")
    if not host.startswith(("http://", "https://")):
        raise SubmitError(f"--host must be an http(s) URL of the Kubeflow Pipelines API, got {host!r}")
    # Pre-flight: kfp.Client retries an unreachable host for ~30 s and then raises a TimeoutError
    # naming no URL; one short request tells the user at once what is wrong.
    try:
        r = httpx.get(f"{host}/apis/v2beta1/healthz", timeout=timeout)
    except httpx.HTTPError as exc:
        raise SubmitError(
            f"cannot reach Kubeflow Pipelines at {host} ({type(exc).__name__}: {exc}). Check the URL, or "
            "port-forward the API: `kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80` and use "
            "--host http://localhost:8080") from exc
    if r.status_code in (401, 403):
        raise SubmitError(f"Kubeflow Pipelines at {host} refused the request (HTTP {r.status_code}): "
                          "authenticate (e.g. KF_PIPELINES_SA_TOKEN_PATH or a session cookie)")
    if r.status_code >= 400:
        raise SubmitError(f"{host} answered HTTP {r.status_code} on /apis/v2beta1/healthz: "
                          "not a Kubeflow Pipelines v2 API endpoint?")
    import kfp

    from pipelines.kfp_pipeline import BASE_IMAGE, compile_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        path = package or compile_pipeline(Path(tmp) / "covid_cxr_training.yaml")
        if image:
            path = with_image(path, image, Path(tmp) / "covid_cxr_training.image.yaml")
        try:
            client = kfp.Client(host=host, namespace=namespace or "kubeflow")
            run = client.create_run_from_pipeline_package(
                str(path), arguments=arguments, run_name=run_name, experiment_name=experiment,
                namespace=namespace, enable_caching=False)
        except Exception as exc:  # noqa: BLE001 - API errors of any kind: one clear line
            raise SubmitError(f"Kubeflow Pipelines at {host} did not accept the run: "
                              f"{type(exc).__name__}: {str(exc).strip()[:500]}") from exc
    run_id = getattr(run, "run_id", None)
    return {"run_id": run_id, "experiment": experiment, "host": host,
            "url": f"{host}/#/runs/details/{run_id}", "image": image or BASE_IMAGE}


@pipeline_app.command("submit")
def submit_cmd(
    host: str = typer.Option(..., "--host", help="Kubeflow Pipelines API URL, e.g. http://localhost:8080"),
    experiment: str = typer.Option("covid-cxr", "--experiment"),
    run_name: Optional[str] = typer.Option(None, "--run-name"),
    namespace: Optional[str] = typer.Option(None, "--namespace", help="Multi-user Kubeflow: profile namespace."),
    dataset: str = typer.Option("cohort", "--dataset"),
    external: list[str] = typer.Option([], "--external"),
    epochs: int = typer.Option(15, "--epochs"),
    image_size: int = typer.Option(224, "--image-size"),
    encoder: str = typer.Option("densenet121", "--encoder"),
    batch_size: int = typer.Option(16, "--batch-size"),
    seed: int = typer.Option(42, "--seed"),
    as_user: Optional[str] = typer.Option(None, "--as"),
    timeout: float = typer.Option(5.0, "--timeout", help="Seconds to wait for the endpoint."),
    image: Optional[str] = typer.Option(None, "--image", help="Container image for every task (default "
                                        "covid-cxr:latest), e.g. your registry's GPU build of the Dockerfile."),
    nodes: int = typer.Option(1, "--nodes", min=1, help="TrainJob nodes (Kubeflow Trainer, torch-distributed)"),
    gpus_per_node: int = typer.Option(1, "--gpus-per-node", min=0, help="GPUs per TrainJob node (0: CPU, gloo)"),
) -> None:
    """Submit the compiled pipeline to a Kubeflow cluster (image covid-cxr:latest, GPU for training)."""
    from app.config import acting_user

    args = {"dataset_name": dataset, "external_datasets": json.dumps(list(external)), "epochs": epochs,
            "image_size": image_size, "encoder": encoder, "batch_size": batch_size, "seed": seed,
            "actor": acting_user(as_user), "train_nodes": nodes, "gpus_per_node": gpus_per_node}
    if image:
        args["train_image"] = image  # the TrainJob's pods run the same image
    try:
        out = submit_pipeline(host, experiment=experiment, arguments=args, run_name=run_name,
                              namespace=namespace, timeout=timeout, image=image)
    except SubmitError as exc:
        _die(str(exc))
        return
    typer.echo(json.dumps(out, indent=2))


# --------------------------------------------------------------------------------------------
# reproduce
# --------------------------------------------------------------------------------------------
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

    from app.config import get_settings
    from pipelines.datasets import dataset_version
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

    from app.config import get_settings

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
    from app.config import acting_user, get_settings, git_commit
    from compliance.audit import record_event
    from models.train import train
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
        result = train(dataset, **kwargs)
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


def reproduce_cmd(
    run_id: str = typer.Argument(..., help="MLflow run id of a training run (or of a pipeline run)."),
    tolerance: float = typer.Option(0.02, "--tolerance", help="Largest accepted |difference| per metric."),
    as_user: Optional[str] = typer.Option(None, "--as"),
    keep_data: bool = typer.Option(False, "--keep-data", help="Keep an older dataset version checked out."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Re-run training from a run's lineage (dataset version, commit, parameters, seed); compare metrics."""
    try:
        out = reproduce_run(run_id, tolerance=tolerance, actor=as_user, keep_data=keep_data)
    except ReproduceError as exc:
        _die(str(exc))
        return
    except Exception as exc:  # noqa: BLE001 - e.g. training refused its input: one clear line
        _die(f"reproduction of {run_id} failed: {type(exc).__name__}: {exc}")
        return
    if as_json:
        typer.echo(json.dumps(out, indent=2, default=str))
    else:
        from rich.console import Console
        from rich.table import Table

        con = Console()
        t = Table(title=f"reproduce {out['run_id']} → {out['reproduced_run_id']} "
                        f"(dataset {out['dataset_name']} @ {out['dataset_version']}, tolerance ±{tolerance})")
        for col in ["metric", "recorded", "reproduced", "difference", "within tolerance"]:
            t.add_column(col)
        for r in out["metrics"]:
            f = (lambda v: "n/a" if v is None else f"{v:.4f}")
            t.add_row(r["metric"], f(r["recorded"]), f(r["reproduced"]),
                      "n/a" if r["difference"] is None else f"{r['difference']:+.4f}", "yes" if r["within"] else "NO")
        con.print(t)
        for n in out["notes"]:
            con.print(f"note: {n}")
        con.print("reproduced within tolerance" if out["within_tolerance"] else "[red]NOT reproduced within tolerance[/]")
    if not out["within_tolerance"]:
        raise typer.Exit(1)


def register(root: typer.Typer) -> None:
    root.add_typer(pipeline_app, name="pipeline")
    root.command("reproduce")(reproduce_cmd)
