"""Session fixture for the API tests: one tiny *real* model, approved to champion, users for every role.

Everything is real: the synthetic cohort (`cxr data synth`), the ingest, training (small encoder,
64 px, 1 epoch on 40 synthetic patients, CPU), the MLflow registry (SQLite under a session CXR_HOME),
the governance approval with e-signature (``compliance.approvals.approve_model_version`` moves the
``champion`` alias; the release policy is overridden with a signed reason because a 1-epoch model
on 40 patients cannot pass it), users and bearer tokens from ``compliance.users``.

Import in a test module with ``from api_fixtures import api_env  # noqa: F401``.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "correct-horse-battery"
ROLES = ("clinician", "researcher", "approver", "compliance_officer", "admin")
USERS = {"clinician": "dr-clin", "researcher": "rita", "approver": "alice", "compliance_officer": "carl",
         "admin": "root-admin"}
# sites: the main clinician works at site-a only (may omit `site`); a second clinician at site-b is the
# attacker of the object-level tests (token key "clinician_b"); site-c is configured, nobody files there
SITES = {"clinician": ("site-a",), "admin": ("site-a", "site-b", "site-c")}
CLINICIAN_B = ("dr-b", ("site-b",))
ENV_KEYS = ("CXR_HOME", "CXR_PROJECT_ROOT", "MLFLOW_TRACKING_URI", "CXR_DATABASE_URL", "CXR_AUDIT_HMAC_KEY",
            "CXR_CHAMPION_POLL_SECONDS", "CXR_USER")


@dataclass
class ApiEnv:
    home: Path
    project: Path
    version: str  # the current champion (updated by ``new_champion``)
    tokens: dict[str, str]  # role -> bearer token
    users: dict[str, str] = field(default_factory=lambda: dict(USERS))
    password: str = PASSWORD
    extra_versions: list[str] = field(default_factory=list)
    database_url: str | None = None  # the app database when not the SQLite default (PostgreSQL runs)
    backend: str = "sqlite"

    def headers(self, role: str, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}", **extra}

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"CXR_HOME": str(self.home), "CXR_PROJECT_ROOT": str(self.project),
                    "CXR_CHAMPION_POLL_SECONDS": "0.5", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
                    "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")})
        for k in ("MLFLOW_TRACKING_URI", "CXR_DATABASE_URL", "CXR_AUDIT_HMAC_KEY"):
            env.pop(k, None)
        if self.database_url:
            env["CXR_DATABASE_URL"] = self.database_url
        return env

    def new_champion(self, reason: str = "switch test: same weights re-registered") -> str:
        """Register the champion's run again as a new version and approve it (a real alias move)."""
        from mlflow import MlflowClient

        from compliance.approvals import approve_model_version
        from core.config import get_settings

        s = get_settings()
        c = MlflowClient(tracking_uri=s.tracking_uri, registry_uri=s.tracking_uri)
        base = c.get_model_version(s.registered_model_name, self.version)
        tags = {k: v for k, v in (base.tags or {}).items()
                if k in ("dataset_version", "git_commit", "trained_by", "registered_by")}
        mv = c.create_model_version(s.registered_model_name, source=base.source, run_id=base.run_id,
                                    tags={**tags, "status": "candidate"})
        approve_model_version(str(mv.version), approver=USERS["approver"], password=PASSWORD, reason=reason,
                              override_policy_reason="tiny CI model: the release policy cannot pass on 40 patients")
        self.extra_versions.append(self.version)
        self.version = str(mv.version)
        return self.version


def _reset() -> None:
    from core.config import reset_settings
    from core.db import dispose_engines

    dispose_engines()
    reset_settings()


def _synth(out: Path, patients: int, seed: int) -> None:
    """The synthetic cohort generator behind `cxr data synth` (small 128-px images to keep CI fast)."""
    from pipelines.synth import synthesize_cohort

    synthesize_cohort(patients, out, seed=seed, image_size=128)


@pytest.fixture(scope="session")
def api_env(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> ApiEnv:
    """Parametrised by the app database backend (tests/conftest.py: ``sqlite`` or ``postgresql``)."""
    backend = getattr(request, "param", "sqlite")
    saved = {k: os.environ.get(k) for k in ENV_KEYS}
    base = tmp_path_factory.mktemp(f"api-{backend}")
    home, project = base / "home", base / "project"
    home.mkdir()
    project.mkdir()
    os.environ.update({"CXR_HOME": str(home), "CXR_PROJECT_ROOT": str(project), "CXR_CHAMPION_POLL_SECONDS": "0.5",
                       "CXR_USER": "rita"})
    for k in ("MLFLOW_TRACKING_URI", "CXR_DATABASE_URL", "CXR_AUDIT_HMAC_KEY"):
        os.environ.pop(k, None)
    database_url = None
    if backend == "postgresql":
        _, database_url = request.getfixturevalue("postgres_server").create_database("cxr_api")
        os.environ["CXR_DATABASE_URL"] = database_url
    _reset()
    try:
        from compliance.approvals import approve_model_version
        from compliance.users import create_user, issue_token
        from models.train import train
        from pipelines.ingest import import_dataset

        for role, name in USERS.items():
            create_user(name, role, PASSWORD, full_name=f"Test {role.replace('_', ' ').title()}", actor="bootstrap",
                        sites=SITES.get(role))
        create_user(CLINICIAN_B[0], "clinician", PASSWORD, full_name="Test Clinician B", actor="bootstrap",
                    sites=CLINICIAN_B[1])
        _synth(base / "synth", patients=40, seed=11)
        import_dataset(base / "synth", "apicohort", seed=11, actor=USERS["researcher"], track=False, quiet=True,
                       workers=1)
        result = train("apicohort", epochs=1, image_size=64, encoder="small", batch_size=8, device="cpu", seed=7,
                       actor=USERS["researcher"], n_bootstrap=20, show_progress=False, num_workers=0)
        version = str(result["model_version"])
        approve_model_version(version, approver=USERS["approver"], password=PASSWORD,
                              reason="API test champion (tiny synthetic model)",
                              override_policy_reason="tiny CI model: the release policy cannot pass on 40 patients")
        tokens = {role: issue_token(name, actor=USERS["admin"]) for role, name in USERS.items()}
        tokens["clinician_b"] = issue_token(CLINICIAN_B[0], actor=USERS["admin"])
        yield ApiEnv(home=home, project=project, version=version, tokens=tokens, database_url=database_url,
                     backend=backend)
    finally:
        _reset()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------ in-process app
@contextmanager
def started_client(settings=None, model_service=None, ready_timeout: float = 120.0) -> Iterator:
    """A FastAPI TestClient on a fresh app whose lifespan ran and whose champion is loaded
    (the app's model service ready), for the session's API environment."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    app = create_app(settings, model_service=model_service) if model_service is not None else create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as c:
        svc = app.state.model_service
        assert svc.wait_ready(ready_timeout), svc.last_error
        yield c


# ------------------------------------------------------------------ real uvicorn server helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``cxr serve`` equivalent (uvicorn, app factory) in a subprocess on 127.0.0.1."""

    def __init__(self, env: ApiEnv, port: int | None = None, log: Path | None = None) -> None:
        self.env, self.port = env, port or free_port()
        self.log = log or env.home / f"server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> "Server":
        import httpx

        fh = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:app_factory", "--factory", "--host", "127.0.0.1",
             "--port", str(self.port), "--no-access-log", "--log-level", "warning"],
            cwd=str(REPO), env=self.env.env(), stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server not ready in {timeout} s: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        import signal

        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
