"""Everything on PostgreSQL: MLflow's backend store (``CXR_MLFLOW_TRACKING_URI=postgresql+psycopg://...``) and
the app database (``CXR_DATABASE_URL``), on the real test server (tests/postgres_server.py).

A tiny model (small encoder, 64 px, 1 epoch, CPU) is trained and registered; the run and the registered
version are then read back *from PostgreSQL's own tables* (not through MLflow), so a silent fallback to a
SQLite file would fail the test; the version loads back for serving through the registry.
"""
from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool


@pytest.mark.parametrize("app_db_backend", ["postgresql"], indirect=True)
def test_train_and_register_with_mlflow_on_postgres(cxr_env, postgres_server, monkeypatch):
    from compliance.audit import list_events, verify_chain
    from core.config import get_settings, reset_settings
    from models.registry import get_model_version, load_clinical_model
    from pipelines.ingest import import_dataset
    from pipelines.lifecycle import train_and_record as train  # the audited lifecycle step
    from pipelines.synth import synthesize_cohort

    _, mlflow_url = postgres_server.create_database("mlflow")
    monkeypatch.setenv("CXR_MLFLOW_TRACKING_URI", mlflow_url)
    reset_settings()
    settings = get_settings()
    assert settings.tracking_uri == mlflow_url and settings.app_database_url.startswith("postgresql+psycopg://")

    synthesize_cohort(24, cxr_env / "synth", seed=3, image_size=64)
    import_dataset(cxr_env / "synth", "pgcohort", seed=3, actor="rita", track=False, quiet=True, workers=1)
    result = train("pgcohort", epochs=1, image_size=32, encoder="small", batch_size=8, device="cpu", seed=5,
                   actor="rita", n_bootstrap=5, show_progress=False, num_workers=0)
    assert result["model_version"] == "1"

    # read MLflow's tables on PostgreSQL directly
    engine = sa.create_engine(mlflow_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            versions = conn.execute(sa.text("SELECT name, version, run_id FROM model_versions")).all()
            runs = conn.execute(sa.text("SELECT run_uuid, status FROM runs")).all()
            tags = dict(conn.execute(sa.text("SELECT key, value FROM model_version_tags WHERE version = 1")).all())
    finally:
        engine.dispose()
    assert [(n, int(v), r) for n, v, r in versions] == [("covid-cxr", 1, result["run_id"])]
    assert runs == [(result["run_id"], "FINISHED")]
    assert tags["status"] == "candidate" and tags["dataset_name"] == "pgcohort"
    assert not (settings.state_dir / "mlflow.db").exists()  # nothing fell back to the SQLite default

    assert get_model_version(1)["run_id"] == result["run_id"]
    model = load_clinical_model("1")
    assert model.version == "1"
    actions = [e["action"] for e in list_events()]
    assert {"training.started", "model.registered", "training.finished"} <= set(actions)
    assert verify_chain().ok
