"""Real DVC round trip on a temporary git + DVC project: import → push → wipe → pull → identical;
add-batch makes a new version and the old one comes back with git checkout + dvc checkout."""
from __future__ import annotations

import csv
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from test_import_dicom import VITAL_HEADER, vitals_row, write_dicom


def _git(project: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True, check=True)
    return proc.stdout.strip()


@pytest.fixture()
def git_project(cxr_env: Path) -> Path:
    project = cxr_env / "project"
    _git(project, "init", "-q")
    _git(project, "config", "user.email", "test@example.invalid")
    _git(project, "config", "user.name", "test")
    (project / "README.md").write_text("test project\n")
    _git(project, "add", "README.md")
    _git(project, "commit", "-q", "-m", "init")
    return project


def _folder(path: Path, n: int, prefix: str, seed0: int, variant: str = "") -> Path:
    path.mkdir(parents=True)
    rows = []
    labels = ["covid19", "normal", "other_pneumonia"]
    for i in range(n):
        fn = f"{prefix}{i:02d}.dcm"
        write_dicom(path / fn, seed=seed0 + i, patient_id=f"{prefix}-{i}")
        rows.append(vitals_row(fn, f"{prefix}-{i}", labels[i % 3], variant=variant))
    with open(path / "vitals.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=VITAL_HEADER)
        w.writeheader()
        w.writerows(rows)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_dvc_push_pull_versions_and_add_batch(cxr_env: Path, git_project: Path):
    import pandas as pd
    import typer
    from typer.testing import CliRunner

    from app.cli.data_import import register_data_commands
    from models.datasets import dataset_version, load_dataset
    from pipelines.dvc_store import checkout_dataset, dataset_md5, pull_dataset
    from pipelines.ingest import add_batch, import_dataset

    src = _folder(cxr_env / "batch0", 9, "P", 0)
    s = import_dataset(src, "cohort", seed=1, actor="tester", workers=1, quiet=True)
    project = git_project
    assert (project / ".dvc").is_dir() and (project / "data" / "cohort.dvc").exists()
    config = (project / ".dvc" / "config").read_text()
    assert "analytics = false" in config.lower() and "check_update = false" in config.lower()
    md5_v1 = s.dvc_md5
    assert md5_v1 and md5_v1.endswith(".dir") and dataset_md5("cohort") == md5_v1
    remote = cxr_env / "home" / "dvc-remote"
    assert remote.is_dir() and any(p.is_file() for p in remote.rglob("*"))
    _git(project, "add", "data/cohort.dvc", "data/.gitignore", ".dvc/config", ".dvc/.gitignore", ".dvcignore")
    _git(project, "commit", "-q", "-m", "dataset cohort v1")
    commit_v1 = _git(project, "rev-parse", "HEAD")
    assert dataset_version("cohort")["git_commit"].startswith(commit_v1)

    manifest = project / "data" / "cohort" / "manifest.parquet"
    h1 = _sha(manifest)
    n_arrays = len(list((project / "data" / "cohort" / "arrays").glob("*.npy")))
    # wipe cache and data, pull from the remote
    shutil.rmtree(project / ".dvc" / "cache")
    shutil.rmtree(project / "data" / "cohort")
    pull_dataset("cohort")
    assert _sha(manifest) == h1
    assert len(list((project / "data" / "cohort" / "arrays").glob("*.npy"))) == n_arrays

    # cxr data versions lists it with its hash
    app = typer.Typer()
    register_data_commands(app)

    @app.callback()
    def _root():  # keep sub-commands as sub-commands
        pass

    res = CliRunner().invoke(app, ["versions", "--json"])
    assert res.exit_code == 0, res.output
    assert '"cohort"' in res.output and md5_v1 in res.output
    res = CliRunner().invoke(app, ["versions"])
    assert res.exit_code == 0 and "cohort" in res.output

    # add a new batch: existing rows keep their split, new version, old one retrievable
    before = load_dataset("cohort").manifest[["image_hash", "split"]]
    src2 = _folder(cxr_env / "batch1", 6, "Q", 100)
    s2 = add_batch(src2, "cohort", tag="variant-b", seed=1, actor="tester", workers=1, quiet=True)
    assert s2.n_accepted == 6 and s2.batch == 1
    md5_v2 = dataset_md5("cohort")
    assert md5_v2 and md5_v2 != md5_v1
    after = load_dataset("cohort").manifest
    assert len(after) == len(before) + 6
    merged = before.merge(after[["image_hash", "split"]], on="image_hash", suffixes=("_old", "_new"))
    assert len(merged) == len(before) and (merged["split_old"] == merged["split_new"]).all()
    assert set(after.loc[after["batch"] == 1, "variant"]) == {"variant-b"}
    batches = load_dataset("cohort").metadata["batches"]
    assert [b["batch"] for b in batches] == [0, 1] and batches[1]["parent_dvc_md5"] == md5_v1
    assert after.groupby("patient_id")["split"].nunique().max() == 1
    _git(project, "add", "data/cohort.dvc")
    _git(project, "commit", "-q", "-m", "dataset cohort v2")
    h2 = _sha(manifest)
    assert h2 != h1

    _git(project, "checkout", "-q", commit_v1, "--", "data/cohort.dvc")
    checkout_dataset("cohort")
    assert _sha(manifest) == h1 and dataset_md5("cohort") == md5_v1
    assert len(pd.read_parquet(manifest)) == len(before)
    _git(project, "checkout", "-q", "HEAD", "--", "data/cohort.dvc")
    checkout_dataset("cohort")
    assert _sha(manifest) == h2
