"""Shared fixtures: every test gets its own CXR_HOME (state) and project root (data/ + DVC)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = (REPO_ROOT.parent / "shared" / "data" / "covid-chestxray-dataset").resolve()


# ------------------------------------------------------------------ app database backends
# Modules marked ``app_databases`` run every test that uses ``cxr_env`` (or the API's ``api_env``) once per
# backend: SQLite (the embedded default) and a real PostgreSQL server (tests/postgres_server.py).
# ``--db sqlite|postgresql|both`` (default both; env CXR_TEST_DB) picks them.
DB_BACKENDS = ("sqlite", "postgresql")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--db", choices=("sqlite", "postgresql", "both"), default=os.environ.get("CXR_TEST_DB", "both"),
                     help="app database backend(s) for tests marked app_databases (default: both)")


def selected_backends(config: pytest.Config) -> tuple[str, ...]:
    choice = config.getoption("--db")
    return DB_BACKENDS if choice == "both" else (choice,)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marked = metafunc.definition.get_closest_marker("app_databases") is not None
    if "app_db_backend" in metafunc.fixturenames and marked:
        metafunc.parametrize("app_db_backend", selected_backends(metafunc.config), indirect=True)
    if "api_env" in metafunc.fixturenames:
        # api_env is session-scoped: every user of it is parametrised (sqlite alone when unmarked) so the
        # SQLite instance is built once and shared, the PostgreSQL one once more
        backends = selected_backends(metafunc.config) if marked else ("sqlite",)
        metafunc.parametrize("api_env", backends, indirect=True, scope="session")


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL server for the session (skips when the machine has none, unless
    CXR_REQUIRE_POSTGRES=1 makes that a failure)."""
    from postgres_server import PostgresServer, PostgresUnavailable

    try:
        server = PostgresServer().start()
    except PostgresUnavailable as exc:
        if os.environ.get("CXR_REQUIRE_POSTGRES") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def app_db_backend(request: pytest.FixtureRequest) -> str:
    return getattr(request, "param", "sqlite")


def _reset() -> None:
    from core.config import reset_settings
    from core.db import dispose_engines

    dispose_engines()
    reset_settings()


@pytest.fixture()
def cxr_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest,
            app_db_backend: str) -> Path:
    """Isolated state: CXR_HOME=tmp/home, project root=tmp/project (an empty folder).

    On the ``postgresql`` backend the app database (CXR_DATABASE_URL) is a fresh database on the session's
    PostgreSQL server, dropped afterwards; MLflow stays on SQLite under CXR_HOME."""
    home = tmp_path / "home"
    project = tmp_path / "project"
    home.mkdir()
    project.mkdir()
    monkeypatch.setenv("CXR_HOME", str(home))
    monkeypatch.setenv("CXR_PROJECT_ROOT", str(project))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("CXR_DATABASE_URL", raising=False)
    monkeypatch.delenv("CXR_AUDIT_HMAC_KEY", raising=False)
    db_name = None
    if app_db_backend == "postgresql":
        pg = request.getfixturevalue("postgres_server")
        db_name, url = pg.create_database()
        monkeypatch.setenv("CXR_DATABASE_URL", url)
    _reset()
    yield tmp_path
    _reset()
    if db_name:
        pg.drop_database(db_name)


@pytest.fixture(scope="session")
def shared_dataset() -> Path:
    if not (SHARED_DATA / "metadata.csv").exists():
        pytest.skip(f"real dataset not found at {SHARED_DATA}")
    return SHARED_DATA
