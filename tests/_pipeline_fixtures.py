"""Helpers for the pipeline tests: a throw-away git + DVC project with a synthetic imported cohort.

Everything is real: the synthetic DICOM generator (`cxr data synth`), the ingest, `git`, `dvc`
(local remote under CXR_HOME), MLflow (SQLite under CXR_HOME) and kfp's local runner. The project
root is the `cxr_env` fixture's temporary folder, never the repository itself.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from typer.testing import CliRunner

# Tiny CPU settings: 64 px, small encoder, 2 epochs (STACK.md: keep CI training tiny).
TINY = {"epochs": 2, "image_size": 64, "encoder": "small", "batch_size": 8, "seed": 7}
TINY_VALIDATION = {"min_train": 6, "min_val": 1, "min_test": 3, "min_class_fraction": 0.05}


def git(project: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True)
    assert proc.returncode == 0, f"git {' '.join(args)} failed: {proc.stderr}"
    return proc.stdout.strip()


def init_project(project: Path) -> None:
    """Make the temporary project root a git repository with DVC initialised (telemetry off)."""
    from pipelines.dvc_store import ensure_dvc_repo

    git(project, "init", "-q", "-b", "main")
    git(project, "config", "user.email", "ci@example.org")
    git(project, "config", "user.name", "CI")
    ensure_dvc_repo(project)
    commit_all(project, "init dvc")


def commit_all(project: Path, message: str) -> str:
    git(project, "add", "-A")
    git(project, "commit", "-q", "--allow-empty", "-m", message)
    return git(project, "rev-parse", "HEAD")


def synth(out: Path, *, patients: int, seed: int, variant: str | None = None, image_size: int = 128) -> Path:
    """`cxr data synth --patients N --out DIR --seed S [--variant V]` through the real CLI (small images)."""
    from app.cli import root

    args = ["data", "synth", "--patients", str(patients), "--out", str(out), "--seed", str(seed),
            "--image-size", str(image_size)]
    if variant:
        args += ["--variant", variant]
    res = CliRunner().invoke(root, args)
    assert res.exit_code == 0, res.output
    return out


def import_cohort(tmp: Path, name: str = "cohort", *, patients: int = 30, seed: int = 3) -> dict:
    """Synthesize + import + DVC-track + git-commit a cohort; returns its dataset version."""
    from models.datasets import dataset_version
    from pipelines.ingest import import_dataset

    project = tmp / "project"
    if not (project / ".git").exists():
        init_project(project)
    src = synth(tmp / f"synth-{name}", patients=patients, seed=seed)
    import_dataset(src, name, seed=seed, actor="rita", quiet=True, workers=1)
    commit_all(project, f"import {name}")
    return dataset_version(name)


def researcher_env(name: str = "rita") -> dict[str, str]:
    """``CXR_TOKEN`` of a researcher (created when missing): governed commands (``pipeline run``,
    ``reproduce``) authenticate the person they name."""
    from compliance.users import UserError, create_user, issue_token

    try:
        create_user(name, "researcher", "pipeline-researcher-pass-17", actor="test")
    except UserError:
        pass  # already there
    return {"CXR_TOKEN": issue_token(name, actor="test")}
