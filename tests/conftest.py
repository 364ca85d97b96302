"""Shared fixtures: every test gets its own CXR_HOME (state) and project root (data/ + DVC)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = (REPO_ROOT.parent / "shared" / "data" / "covid-chestxray-dataset").resolve()


def _reset() -> None:
    from core.config import reset_settings
    from core.db import dispose_engines

    dispose_engines()
    reset_settings()


@pytest.fixture()
def cxr_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Isolated state: CXR_HOME=tmp/home, project root=tmp/project (an empty folder)."""
    home = tmp_path / "home"
    project = tmp_path / "project"
    home.mkdir()
    project.mkdir()
    monkeypatch.setenv("CXR_HOME", str(home))
    monkeypatch.setenv("CXR_PROJECT_ROOT", str(project))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("CXR_DATABASE_URL", raising=False)
    monkeypatch.delenv("CXR_AUDIT_HMAC_KEY", raising=False)
    _reset()
    yield tmp_path
    _reset()


@pytest.fixture(scope="session")
def shared_dataset() -> Path:
    if not (SHARED_DATA / "metadata.csv").exists():
        pytest.skip(f"real dataset not found at {SHARED_DATA}")
    return SHARED_DATA
