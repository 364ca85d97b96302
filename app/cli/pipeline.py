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
from pathlib import Path
from typing import Any, Optional

import typer

from pipelines.reproduce import ReproduceError, reproduce_run
from pipelines.submit import SubmitError, submit_pipeline

pipeline_app = typer.Typer(help="Kubeflow pipeline: compile, run locally, submit to a cluster.",
                           no_args_is_help=True)



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
    as_user: Optional[str] = typer.Option(None, "--as", help="Acting user (else CXR_USER); authenticated by "
                                          "--password-stdin, or use CXR_TOKEN."),
    password_stdin: bool = typer.Option(False, "--password-stdin", help="Read the acting user's password from stdin."),
    as_json: bool = typer.Option(False, "--json", help="Print the final pipeline state as JSON."),
) -> None:
    """Run the training pipeline: validate → train → evaluate → compare → register challenger → policy."""
    if not local:
        _die("only --local runs here; to run on a Kubeflow cluster use `cxr pipeline submit --host URL`", 2)
    from app.cli.models import researcher_identity

    actor = researcher_identity(as_user, password_stdin, "pipeline.run")
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
    password_stdin: bool = typer.Option(False, "--password-stdin"),
    timeout: float = typer.Option(5.0, "--timeout", help="Seconds to wait for the endpoint."),
    image: Optional[str] = typer.Option(None, "--image", help="Container image for every task (default "
                                        "covid-cxr:latest), e.g. your registry's GPU build of the Dockerfile."),
    nodes: int = typer.Option(1, "--nodes", min=1, help="TrainJob nodes (Kubeflow Trainer, torch-distributed)"),
    gpus_per_node: int = typer.Option(1, "--gpus-per-node", min=0, help="GPUs per TrainJob node (0: CPU, gloo)"),
) -> None:
    """Submit the compiled pipeline to a Kubeflow cluster (image covid-cxr:latest, GPU for training)."""
    from app.cli.models import researcher_identity

    # authenticated here, before the run leaves this machine: the cluster records this name
    actor = researcher_identity(as_user, password_stdin, "pipeline.submit")
    args = {"dataset_name": dataset, "external_datasets": json.dumps(list(external)), "epochs": epochs,
            "image_size": image_size, "encoder": encoder, "batch_size": batch_size, "seed": seed,
            "actor": actor, "train_nodes": nodes, "gpus_per_node": gpus_per_node}
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
















def reproduce_cmd(
    run_id: str = typer.Argument(..., help="MLflow run id of a training run (or of a pipeline run)."),
    tolerance: float = typer.Option(0.02, "--tolerance", help="Largest accepted |difference| per metric."),
    as_user: Optional[str] = typer.Option(None, "--as"),
    password_stdin: bool = typer.Option(False, "--password-stdin"),
    keep_data: bool = typer.Option(False, "--keep-data", help="Keep an older dataset version checked out."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Re-run training from a run's lineage (dataset version, commit, parameters, seed); compare metrics."""
    from app.cli.models import researcher_identity

    actor = researcher_identity(as_user, password_stdin, "reproduce")
    try:
        out = reproduce_run(run_id, tolerance=tolerance, actor=actor, keep_data=keep_data)
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
