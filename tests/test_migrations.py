"""Alembic owns the app schema: a database made by the last release before migrations is upgraded
with nothing lost and its audit chain still verifying; an outdated schema stops the API.

The old database is made by the *release's own code* (``git archive 8bb68d3``, run in a subprocess):
its users, tokens, audit entries, predictions and outcomes, as its API recorded them — on SQLite and on
a real PostgreSQL server (``--db``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RELEASE = "8bb68d3"  # the last commit whose schema was made by create_all (core/migrations/versions/0001)
CXR = [sys.executable, "-m", "app.cli"]

FILL = r'''
import json, uuid
from compliance.users import create_user, issue_token
from compliance.audit import record_event
from app import storage
create_user("ada-admin", "admin", "release-admin-password", actor="bootstrap")
create_user("cleo", "clinician", "release-clinician-pw", actor="ada-admin")
token = issue_token("cleo", actor="ada-admin")
ids = []
for i in range(3):
    row = {"id": str(uuid.uuid4()), "created_at": storage.utc_now(), "model_name": "covid-cxr", "model_version": "1",
           "site": "site-a", "accession_hash": storage.accession_hash(f"ACC-{i}"), "requested_by": "cleo",
           "probabilities": {"covid19": 0.7, "other_pneumonia": 0.2, "normal": 0.1}, "p_covid19": 0.7,
           "operating_threshold": 0.5, "decision": "covid19-positive", "ood_score": 0.1, "warnings": [],
           "vitals_present": {"spo2_percent": True}, "view": "PA"}
    pred = storage.save_prediction(row)
    record_event("prediction.served", actor="cleo", role="clinician", subject=f"prediction/{pred['id']}",
                 details={"prediction_id": pred["id"], "model_name": "covid-cxr", "model_version": "1",
                          "site": "site-a", "decision": "covid19-positive", "warnings": []})
    ids.append(pred["id"])
out = storage.save_outcome({"prediction_id": ids[0], "confirmed_class": "covid19", "rtpcr_result": "positive",
                            "truth_positive": True, "recorded_by": "cleo", "recorded_at": storage.utc_now(),
                            "supersedes_id": None, "correction_reason": None, "signed_by": None,
                            "signature_meaning": None})
record_event("outcome.recorded", actor="cleo", role="clinician", subject=f"prediction/{ids[0]}",
             details={"prediction_id": ids[0], "outcome_id": out["id"], "model_version": "1", "site": "site-a",
                      "confirmed_class": "covid19", "rtpcr_result": "positive", "truth_positive": True,
                      "decision": "covid19-positive", "correction": False})
print(json.dumps({"token": token, "predictions": ids}))
'''


def _env(home: Path, project: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_") and k != "PYTHONPATH"}
    env.update(CXR_HOME=str(home), CXR_PROJECT_ROOT=str(project), MLFLOW_DISABLE_TELEMETRY="true", **extra)
    return env


def _rows(url: str) -> dict[str, list[tuple]]:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        out = {}
        with engine.connect() as con:
            for table, cols in (("users", "name, role, password_hash, active, created_at"),
                                ("api_tokens", "token_id, token_sha256, user_id, issued_at"),
                                ("audit_trail", "seq, time_utc, actor, action, details, prev_hash, entry_hash"),
                                ("predictions", "id, created_at, site, accession_hash, probabilities, p_covid19, decision"),
                                ("outcomes", "id, prediction_id, confirmed_class, recorded_by, recorded_at")):
                out[table] = [tuple(r) for r in con.execute(text(f"SELECT {cols} FROM {table} ORDER BY 1"))]
        return out
    finally:
        engine.dispose()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def release_db(tmp_path_factory, request) -> dict:
    """A database made and filled by the release's own code (SQLite file, or a PostgreSQL database)."""
    from conftest import selected_backends

    if request.param not in selected_backends(request.config):
        pytest.skip(f"--db excludes {request.param}")
    have = subprocess.run(["git", "cat-file", "-e", f"{RELEASE}^{{commit}}"], cwd=REPO, capture_output=True)
    if have.returncode != 0:
        pytest.skip(f"commit {RELEASE} is not in this clone's history (shallow clone): cannot build its database")
    base = tmp_path_factory.mktemp("migration")
    release = base / "release"
    release.mkdir()
    archive = subprocess.run(["git", "archive", RELEASE], cwd=REPO, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(release)], input=archive.stdout, check=True)
    home, project = base / "home", base / "project"
    home.mkdir()
    project.mkdir()
    url = f"sqlite:///{home / 'cxr.db'}"
    extra = {}
    if request.param == "postgresql":
        _, url = request.getfixturevalue("postgres_server").create_database("cxr_release")
        extra["CXR_DATABASE_URL"] = url
    proc = subprocess.run([sys.executable, "-c", FILL], cwd=release, capture_output=True, text=True, timeout=300,
                          env=_env(home, project, PYTHONPATH=str(release), **extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"home": home, "project": project, "url": url, "extra": extra, "backend": request.param,
            **json.loads(proc.stdout.strip().splitlines()[-1])}


def test_the_release_database_has_no_version_table(release_db):
    from sqlalchemy import create_engine, inspect

    engine = create_engine(release_db["url"])
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert {"users", "api_tokens", "audit_trail", "predictions", "outcomes"} <= tables
    assert "cxr_alembic_version" not in tables


def test_outdated_schema_is_refused_by_the_code_and_the_api(release_db):
    env = _env(release_db["home"], release_db["project"], **release_db["extra"])
    st = subprocess.run([*CXR, "db", "status", "--json"], capture_output=True, text=True, env=env, cwd=REPO,
                        timeout=120)
    assert st.returncode == 1 and json.loads(st.stdout)["state"] == "legacy", st.stdout + st.stderr
    # the API refuses to start, and says what to run
    from api_fixtures import free_port

    port = free_port()
    api = subprocess.run([*CXR, "serve", "--port", str(port)], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=120)
    assert api.returncode != 0
    assert "cxr db upgrade" in api.stderr + api.stdout, (api.stderr + api.stdout)[-2000:]
    # any other command that opens the database refuses too, before writing anything
    verify = subprocess.run([*CXR, "audit", "verify"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert verify.returncode != 0 and "cxr db upgrade" in verify.stderr + verify.stdout


def test_upgrade_keeps_every_row_and_the_chain_verifies(release_db):
    env = _env(release_db["home"], release_db["project"], **release_db["extra"])
    before = _rows(release_db["url"])
    assert len(before["audit_trail"]) >= 6 and len(before["predictions"]) == 3 and len(before["outcomes"]) == 1
    up = subprocess.run([*CXR, "db", "upgrade"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert up.returncode == 0, up.stderr[-3000:]
    from core.migrate import head_revision

    assert f"→ {head_revision()}" in up.stdout
    assert _rows(release_db["url"]) == before  # nothing lost, nothing changed
    st = subprocess.run([*CXR, "db", "status", "--json"], capture_output=True, text=True, env=env, cwd=REPO,
                        timeout=120)
    assert st.returncode == 0 and json.loads(st.stdout)["state"] == "current"
    # the keyed mode needs a first checkpoint on an upgraded installation (docs/SECURITY.md); then it verifies,
    # the release's plain entries included
    admin = ["--as", "ada-admin", "--password-stdin"]
    cp = subprocess.run([*CXR, "audit", "checkpoint", *admin], input="release-admin-password\n", capture_output=True,
                        text=True, env=env, cwd=REPO, timeout=120)
    assert cp.returncode == 0, cp.stderr[-2000:]
    v = subprocess.run([*CXR, "audit", "verify", "--json"], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=120)
    assert v.returncode == 0, v.stdout[-2000:] + v.stderr[-2000:]
    body = json.loads(v.stdout[v.stdout.find("{"):])
    assert body["ok"] and body["n_entries"] >= len(before["audit_trail"])
    # the release knew no sites: an admin gives its clinician theirs (predictions are site-scoped now)
    sites = subprocess.run([*CXR, "users", "sites", "cleo", "--site", "site-a", *admin],
                           input="release-admin-password\n", capture_output=True, text=True, env=env, cwd=REPO,
                           timeout=120)
    assert sites.returncode == 0, sites.stderr[-2000:]
    # and the upgraded database is used as before: the release's token still authenticates
    from fastapi.testclient import TestClient

    from app.main import create_app
    from core.config import reset_settings
    from core.db import dispose_engines

    old = {k: os.environ.get(k) for k in ("CXR_HOME", "CXR_PROJECT_ROOT", "CXR_DATABASE_URL")}
    os.environ.update(CXR_HOME=str(release_db["home"]), CXR_PROJECT_ROOT=str(release_db["project"]),
                      **release_db["extra"])
    if not release_db["extra"]:
        os.environ.pop("CXR_DATABASE_URL", None)
    dispose_engines()
    reset_settings()
    try:
        with TestClient(create_app(), raise_server_exceptions=False) as client:
            r = client.get(f"/v1/predictions/{release_db['predictions'][0]}",
                           headers={"Authorization": f"Bearer {release_db['token']}"})
            assert r.status_code == 200, r.text
            assert r.json()["outcome"]["confirmed_class"] == "covid19"
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        dispose_engines()
        reset_settings()


def test_a_fresh_database_is_created_at_head(cxr_env):
    from sqlalchemy import inspect

    from core.db import get_engine
    from core.migrate import head_revision, status

    engine = get_engine()
    assert status(engine) == {"current": head_revision(), "head": head_revision(), "state": "current"}
    assert {"users", "audit_trail", "predictions", "outcomes", "pending_vitals", "cxr_alembic_version"} <= set(
        inspect(engine).get_table_names())


def test_the_migrations_build_exactly_the_schema_of_the_tables(tmp_path):
    """No drift: the migrations, run from an empty database, build exactly ``core.schema`` (which is
    what a fresh database is created from), and say so at the head revision."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine

    from core.migrate import VERSION_TABLE, head_revision, status, upgrade
    from core.schema import Base

    engine = create_engine(f"sqlite:///{tmp_path / 'migrated.db'}")
    assert upgrade(engine)["to"] == head_revision() and status(engine)["state"] == "current"
    with engine.connect() as conn:
        mc = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE, "compare_type": True})
        diff = compare_metadata(mc, Base.metadata)
    assert diff == [], diff


def test_app_upgrade_and_mlflow_migrations_in_two_threads_do_not_collide(tmp_path):
    """Alembic's runtime keeps module-global proxies: an app-database upgrade in one thread while MLflow
    migrates a new tracking database in another (the API's champion poller does) gave
    ``KeyError: 'script'``. ``core.migrate`` serialises every in-process Alembic command run."""
    import threading

    from mlflow.store.db.utils import _initialize_tables
    from sqlalchemy import create_engine

    from core.migrate import head_revision, upgrade

    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def mlflow_side() -> None:
        try:
            start.wait()
            for i in range(2):
                _initialize_tables(create_engine(f"sqlite:///{tmp_path / f'mlflow-{i}.db'}"))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    t = threading.Thread(target=mlflow_side)
    t.start()
    start.wait()
    revisions = [upgrade(create_engine(f"sqlite:///{tmp_path / f'app-{i}.db'}"))["to"] for i in range(4)]
    t.join(timeout=300)
    assert not errors, repr(errors[0])
    assert revisions == [head_revision()] * 4
