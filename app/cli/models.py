"""``cxr train`` and ``cxr evaluate`` (heavy imports happen inside the commands)."""
from __future__ import annotations

import json
import os
import sys
from contextlib import redirect_stdout
from typing import Optional

import typer


def _fail(message: str, code: int = 2) -> None:
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def researcher_identity(as_user: str | None, password_stdin: bool, what: str) -> str:
    """The authenticated researcher (or admin) who trains/registers; exits 1 with a message otherwise."""
    from app.cli.identity import authenticated_user
    from compliance.users import GovernanceError, require_role

    try:
        user = authenticated_user(as_user, password_stdin, what=what)
        require_role(user.name, ("researcher", "admin"), action=f"model.{what}")
    except GovernanceError as exc:
        _fail(str(exc), 1)
    return user.name


def train_cmd(
    dataset: str = typer.Option(..., "--dataset", help="imported dataset name (data/NAME)"),
    epochs: int = typer.Option(10, "--epochs", min=1),
    image_size: int = typer.Option(224, "--image-size", min=16, help="network input side (pixels)"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    seed: int = typer.Option(42, "--seed"),
    encoder: str = typer.Option("densenet121", "--encoder", help="densenet121 | small"),
    modalities: str = typer.Option("image,vitals", "--modalities", help="image,vitals | image | vitals"),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    target_sensitivity: float = typer.Option(0.90, "--target-sensitivity",
                                             help="sensitivity the operating threshold reaches on validation"),
    lr: Optional[float] = typer.Option(None, "--lr", help="learning rate (default 1e-3 small, 3e-4 densenet121)"),
    patience: int = typer.Option(5, "--patience", min=1, help="early stopping patience (epochs)"),
    n_bootstrap: int = typer.Option(1000, "--bootstrap", min=0, help="patient-level bootstrap resamples"),
    external: list[str] = typer.Option([], "--external", help="also evaluate on this dataset (repeatable)"),
    resume: bool = typer.Option(False, "--resume", help="continue from this configuration's last checkpoint"),
    deterministic: Optional[bool] = typer.Option(None, "--deterministic/--fast",
                                                 help="deterministic algorithms (default: on for CPU, off for GPU)"),
    shortcut: bool = typer.Option(True, "--shortcut/--no-shortcut",
                                  help="run the shortcut battery (ablations, masked lungs, site probe); a version "
                                       "without it fails the release policy's shortcut criteria"),
    as_user: Optional[str] = typer.Option(None, "--as", help="acting user (default CXR_USER); authenticated by "
                                          "--password-stdin, or use CXR_TOKEN"),
    password_stdin: bool = typer.Option(False, "--password-stdin", help="read the acting user's password from stdin"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object at the end (stdout)"),
    nproc: int = typer.Option(1, "--nproc", min=1,
                              help="data-parallel processes on this machine (DDP: NCCL, one per GPU; gloo on CPU)"),
) -> None:
    """Train FusionNet on a dataset, evaluate it on the test split, register a candidate version
    (researcher or admin, authenticated: the version's trained_by/registered_by name them)."""
    if encoder not in ("densenet121", "small"):
        _fail(f"unknown encoder {encoder!r}: expected densenet121 or small")
    as_user = researcher_identity(as_user, password_stdin, "train")
    from models.network import normalise_modalities

    try:
        mods = normalise_modalities(modalities)
    except ValueError as exc:
        _fail(str(exc))
    from models.train import TrainingError
    from pipelines.lifecycle import train_and_record

    # under torchrun every rank runs this command itself: then each is one process of the job
    nproc = nproc if "WORLD_SIZE" not in os.environ else 1
    try:
        with redirect_stdout(sys.stderr):  # stdout carries only the result
            result = train_and_record(dataset, nproc=nproc, epochs=epochs, image_size=image_size, device=device, seed=seed,
                           modalities=mods, encoder=encoder, batch_size=batch_size,
                           target_sensitivity=target_sensitivity, actor=as_user, resume=resume, lr=lr,
                           patience=patience, n_bootstrap=n_bootstrap, deterministic=deterministic,
                           external=external, show_progress=not json_out or sys.stderr.isatty(),
                           shortcut_battery=shortcut)
    except TrainingError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted: continue with --resume", 130)
    if result.get("model_version") is None:  # a rank > 0 of a distributed run: rank 0 reports
        return
    from models.evaluate import _json_default

    if json_out:
        out = {k: result[k] for k in ("model_version", "run_id", "dataset_version", "dataset", "model_name",
                                      "evaluation", "checkpoint", "warnings")}
        typer.echo(json.dumps(out, default=_json_default))
        return
    from rich.console import Console

    ev = result["evaluation"]
    console = Console()

    def fmt(m):
        if m["value"] is None:
            return "n/a"
        ci = f" [{m['ci_low']:.3f}, {m['ci_high']:.3f}]" if m.get("ci_low") is not None else ""
        return f"{m['value']:.3f}{ci}"

    console.print(f"test split ({ev['n_images']} images, {ev['n_patients']} patients), covid19 vs rest at "
                  f"threshold {ev['threshold']:.3f}:")
    for k in ("auroc", "sensitivity", "specificity", "ppv", "npv"):
        console.print(f"  {k:<12} {fmt(ev[k])}")
    ece = " → ".join("n/a" if e is None else f"{e:.3f}" for e in (ev["ece_before"], ev["ece_after"]))
    console.print(f"  temperature {ev['temperature']:.3f}; ECE (top-label) {ece}")
    for w in result["warnings"]:
        console.print(f"[yellow]warning:[/] {w}")
    typer.echo(f"registered {result['model_name']} version {result['model_version']} "
               f"(run {result['run_id']}, dataset {result['dataset_version']})")


def evaluate_cmd(
    model_version: str = typer.Option(..., "--model-version", help="version number or alias (champion)"),
    dataset: str = typer.Option(..., "--dataset"),
    out: Optional[str] = typer.Option(None, "--out", help="evaluation.json path (plots beside it)"),
    split: Optional[str] = typer.Option(None, "--split",
                                        help="train|val|test|all (default: test on the training dataset, "
                                             "all labelled rows on another)"),
    seed: int = typer.Option(0, "--seed"),
    n_bootstrap: int = typer.Option(1000, "--bootstrap", min=0),
    as_user: Optional[str] = typer.Option(None, "--as"),
    json_out: bool = typer.Option(False, "--json", help="print the evaluation JSON on stdout"),
    allow_version_mismatch: bool = typer.Option(
        False, "--allow-version-mismatch",
        help="evaluate the training dataset even if its version differs from the trained one (labelled)"),
) -> None:
    """Evaluate a registered version on a dataset (external validation only when provenance says so)."""
    from models.datasets import DatasetNotFound
    from models.evaluate import _json_default
    from models.registry import RegistryError
    from models.validation import DatasetVersionMismatch
    from pipelines.lifecycle import evaluate_and_record

    if split not in (None, "train", "val", "test", "all"):
        _fail("--split must be train, val, test or all")
    try:
        with redirect_stdout(sys.stderr):
            ev = evaluate_and_record(model_version, dataset, split=split, out=out, seed=seed,
                                     n_bootstrap=n_bootstrap, actor=as_user,
                                     allow_version_mismatch=allow_version_mismatch)
    except (RegistryError, DatasetNotFound, DatasetVersionMismatch) as exc:
        _fail(str(exc))
    if json_out:
        typer.echo(json.dumps(ev, default=_json_default))
        return
    c = ev["covid19_vs_rest"]

    def fmt(m):
        if m["value"] is None:
            return "n/a"
        return f"{m['value']:.3f}" + (f" [{m['ci_low']:.3f}, {m['ci_high']:.3f}]" if m["ci_low"] is not None else "")

    typer.echo(f"{ev['model_name']} v{ev['model_version']} on {dataset} ({ev['split']}, "
               f"{ev.get('evaluation_role') or ('external' if ev['is_external'] else 'internal')}): "
               f"{ev['n_images']} images, {ev['n_patients']} patients "
               f"({ev.get('n_patients_covid19', '?')} with covid19, {ev.get('n_patients_not_covid19', '?')} without)")
    for k in ("auroc", "sensitivity", "specificity", "ppv", "npv"):
        typer.echo(f"  {k:<12} {fmt(c[k])}")
    cal = (ev.get("calibration") or {}).get("covid19") or {}
    if cal.get("ece"):
        slope = (cal.get("slope") or {}).get("value")
        typer.echo(f"  P(covid19) calibration: ECE {fmt(cal['ece'])}; slope "
                   f"{'n/a' if slope is None else fmt(cal['slope'])}; intercept "
                   f"{'n/a' if (cal.get('intercept') or {}).get('value') is None else fmt(cal['intercept'])}")
    typer.echo(f"  intervals: {ev.get('interval_method', 'patient bootstrap percentile')}")
    prov = ev.get("provenance") or {}
    if ev.get("evaluation_role") != "internal-test" and prov:
        typer.echo("  provenance: " + ("external (sources, sites and images disjoint from training)"
                                       if prov.get("is_external") else
                                       "NOT external: " + "; ".join(prov.get("reasons") or [])))
    for w in ev["warnings"]:
        typer.echo(f"  warning: {w}")
    typer.echo(f"wrote {ev['artifacts']['evaluation_json']}")


def register(root: typer.Typer) -> None:
    root.command("train")(train_cmd)
    root.command("evaluate")(evaluate_cmd)
