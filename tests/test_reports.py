"""Compliance reports (PDF/CSV/JSON) and model cards on a real registry, real audit trail and real
prediction/outcome rows. The PDF is read back with pypdf; the JSON is validated against its schema."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest
import typer
from _governance_fixtures import GOOD_EVALUATION, failing_evaluation, make_version
from typer.testing import CliRunner

TODAY = datetime.now(timezone.utc).date()
FROM, TO = (TODAY - timedelta(days=1)).isoformat(), TODAY.isoformat()


def _pdf_text(path) -> str:
    from pypdf import PdfReader

    return "\n".join(page.extract_text() or "" for page in PdfReader(str(path)).pages)


@pytest.fixture()
def world(cxr_env):
    """Users, two versions (v1 approved champion, v2 failing candidate), predictions and outcomes."""
    from app import storage
    from compliance.approvals import approve_model_version
    from compliance.users import authenticate_password, create_user
    from core.db import session_scope

    create_user("root", "admin", "root-velvet-harbor-19")
    create_user("rita", "researcher", "rita-copper-lantern-27", full_name="Rita Researcher", actor="root")
    create_user("alice", "approver", "alice-quiet-meadow-35", full_name="Alice Approver", actor="root")
    create_user("carol", "compliance_officer", "carol-amber-thistle-48", full_name="Carol Compliance", actor="root")
    v1 = make_version(GOOD_EVALUATION, trained_by="rita", params={"epochs": 3, "encoder": "small"})
    v2 = make_version(failing_evaluation(), trained_by="rita")
    approve_model_version(v1, approver="alice", password="alice-quiet-meadow-35", reason="meets release policy")
    with pytest.raises(Exception):
        authenticate_password("alice", "wrong-password")  # an alert in the period

    # 6 predictions at two sites with outcomes: site-a TP, FN, TN; site-b FP, TP; one without outcome
    cases = [("site-a", "covid19-positive", True), ("site-a", "covid19-negative", True),
             ("site-a", "covid19-negative", False), ("site-b", "covid19-positive", False),
             ("site-b", "covid19-positive", True), ("site-b", "covid19-negative", None)]
    for site, decision, truth in cases:
        pid = storage.new_prediction_id()
        storage.save_prediction({
            "id": pid, "created_at": storage.utc_now(), "model_name": "covid-cxr", "model_version": v1, "site": site,
            "requested_by": "dr-who", "probabilities": {"covid19": 0.6, "other_pneumonia": 0.2, "normal": 0.2},
            "p_covid19": 0.6, "operating_threshold": 0.42, "decision": decision, "warnings": [], "vitals_present": {}})
        if truth is not None:
            with session_scope() as s:
                first = storage.OutcomeRow(prediction_id=pid, truth_positive=not truth, recorded_by="dr-who",
                                           recorded_at=storage.utc_now())  # superseded below
                s.add(first)
                s.flush()
                first_id = first.id
            with session_scope() as s:
                s.add(storage.OutcomeRow(prediction_id=pid, truth_positive=truth, recorded_by="dr-who",
                                         recorded_at=storage.utc_now(), supersedes_id=first_id,
                                         correction_reason="corrected"))
    return {"env": cxr_env, "v1": v1, "v2": v2}


def test_json_report_validates_and_matches_the_trail(world, tmp_path):
    import jsonschema

    from compliance.audit import list_events, verify_chain
    from compliance.reports import export_report, load_schema

    head_before = verify_chain().head_hash
    out = export_report(FROM, TO, "json", tmp_path / "r.json", actor="carol")
    report = json.loads(out.read_text())
    jsonschema.validate(report, load_schema())  # the documented schema
    assert report["audit_chain"]["ok"] and report["audit_chain"]["head_hash"] == head_before

    models = {m["version"]: m for m in report["models"]}
    m1, m2 = models[world["v1"]], models[world["v2"]]
    assert m1["status"] == "approved" and m1["aliases"] == ["champion"]
    assert m1["dataset_version"] == "ds-md5-good" and m1["git_commit"] == "0123abcd"
    assert m1["parameters"] == {"epochs": "3", "encoder": "small"}
    assert m1["evaluation"]["metrics"]["auroc"] == {"value": 0.91, "ci_low": 0.84, "ci_high": 0.96}
    assert m1["evaluation"]["external"][0]["dataset"] == "synthetic-site-b"
    assert m1["policy"]["passed"] and not m2["policy"]["passed"]
    sig = m1["signatures"][0]
    assert sig["signer_full_name"] == "Alice Approver" and sig["valid"] and sig["meaning"] == "approved for clinical use"
    assert [(h["from_version"], h["to_version"]) for h in m1["alias_history"]] == [(None, world["v1"])]

    vol = {(p["model_version"], p["site"]): p["n"] for p in report["predictions"]["by_model_site"]}
    assert vol == {(world["v1"], "site-a"): 3, (world["v1"], "site-b"): 3} and report["predictions"]["total"] == 6
    acc = {a["site"]: a for a in report["accuracy"]["rows"]}
    assert (acc["site-a"]["tp"], acc["site-a"]["fn"], acc["site-a"]["tn"], acc["site-a"]["fp"]) == (1, 1, 1, 0)
    assert (acc["site-b"]["tp"], acc["site-b"]["fp"], acc["site-b"]["n_outcomes"]) == (1, 1, 2)
    assert acc["site-a"]["sensitivity"] == 0.5 and acc["site-b"]["specificity"] == 0.0

    actions = {a["action"] for a in report["alerts"]}
    assert "auth.login_failed" in actions
    assert report["audit_summary"]["by_action"]["model.approved"] == 1

    exported = list_events(action="report.exported")[-1]
    assert exported["actor"] == "carol" and exported["details"]["head_hash"] == head_before
    assert exported["details"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert verify_chain().ok


def test_pdf_and_csv_reports_read_back(world, tmp_path):
    from compliance.audit import list_events
    from compliance.reports import export_report

    pdf = export_report(FROM, TO, "pdf", tmp_path / "r.pdf", actor="carol")
    head = list_events(action="report.exported")[-1]["details"]["head_hash"]
    assert pdf.read_bytes().startswith(b"%PDF")
    text = _pdf_text(pdf)
    assert f"version {world['v1']}" in text and head in text
    assert "Alice Approver" in text and "site-a" in text

    out = export_report(FROM, TO, "csv", tmp_path / "r.csv", actor="carol")
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert rows and set(rows[0]) == {"section", "model_version", "site", "key", "value", "ci_low", "ci_high", "detail"}
    head2 = list_events(action="report.exported")[-1]["details"]["head_hash"]
    assert {"section": "audit_chain", "key": "head_hash", "value": head2} .items() <= \
        [r for r in rows if r["section"] == "audit_chain" and r["key"] == "head_hash"][0].items()
    auroc = [r for r in rows if r["section"] == "evaluation" and r["key"] == "auroc" and r["model_version"] == world["v1"]]
    assert auroc[0]["ci_low"] == "0.84"
    assert any(r["section"] == "signature" and "Alice Approver" in r["detail"] for r in rows)


def test_cli_export_roles_and_broken_chain_alert(world, tmp_path):
    from app.cli.governance import register

    app = typer.Typer()
    register(app)
    runner = CliRunner()
    args = ["audit", "export", "--from", FROM, "--to", TO, "--format", "json", "--out", str(tmp_path / "c.json")]
    auth = ["--password-stdin"]
    env = {"CXR_TOKEN": None}
    r = runner.invoke(app, args, env={**env, "CXR_USER": "carol"})  # a name without a credential
    assert r.exit_code == 1 and "needs an authenticated user" in r.output
    r = runner.invoke(app, [*args, *auth], input="rita-copper-lantern-27\n", env={**env, "CXR_USER": "rita"})
    assert r.exit_code == 1 and "permission denied" in r.output
    r = runner.invoke(app, [*args, *auth], input="carol-amber-thistle-48\n", env={**env, "CXR_USER": "carol"})
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "c.json").read_text())["report"]["generated_by"] == "carol"

    con = sqlite3.connect(world["env"] / "home" / "cxr.db")
    con.execute("UPDATE audit_trail SET actor='mallory' WHERE seq=2")
    con.commit()
    con.close()
    r = runner.invoke(app, [*args, *auth], input="carol-amber-thistle-48\n", env={**env, "CXR_USER": "carol"})
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["audit_chain"]["ok"] is False and report["audit_chain"]["first_bad_seq"] == 2
    assert report["alerts"][0]["action"] == "audit.chain_broken"


def test_model_card_markdown_and_pdf(world, tmp_path):
    from compliance.model_card import SECTIONS, write_model_card

    md = write_model_card(world["v1"], tmp_path / "card.md").read_text()
    for section in SECTIONS:
        assert f"## {section}" in md, section
    assert "0.910 (0.840-0.960)" in md  # AUROC with CI
    assert "synthetic-site-b" in md and "Public-dataset bias" in md and "Alice Approver" in md
    assert "| sex | F |" in md  # subgroups
    md2 = write_model_card(world["v2"], tmp_path / "card2.md").read_text()
    assert "NO external validation recorded" in md2 and "FAIL" in md2 and "Not signed" in md2

    pdf = write_model_card(world["v1"], tmp_path / "card.pdf")
    text = _pdf_text(pdf)
    assert f"version {world['v1']}" in text and "Intended use" in text and "Limitations" in text


def test_registry_changes_behind_governance_are_reported(world, tmp_path):
    """MLflow has no access control: an alias moved or a tag set directly shows up as an alert."""
    from _governance_fixtures import mlflow_client

    from app.cli.governance import register
    from compliance.approvals import governance_inconsistencies
    from compliance.reports import build_report

    assert governance_inconsistencies() == []
    client = mlflow_client()
    client.set_registered_model_alias("covid-cxr", "champion", world["v2"])
    client.set_model_version_tag("covid-cxr", world["v2"], "status", "approved")
    problems = {f["problem"] for f in governance_inconsistencies()}
    assert any("moved outside governance" in p for p in problems)
    assert "champion has no approval signature" in problems
    assert "status tag 'approved' without an approval signature" in problems
    alerts = [a for a in build_report(FROM, TO)["alerts"] if a["action"] == "governance.inconsistency"]
    assert len(alerts) == 3 and alerts[0]["subject"] == f"model-version/{world['v2']}"

    # read-only model commands work from the CLI and show the lineage
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    res = runner.invoke(app, ["model", "list", "--json"])
    assert res.exit_code == 0 and [v["version"] for v in json.loads(res.stdout)] == [world["v1"], world["v2"]]
    res = runner.invoke(app, ["model", "show", world["v1"]])
    assert res.exit_code == 0 and "Alice Approver" in res.output and "ds-md5-good" in res.output
    res = runner.invoke(app, ["model", "card", world["v1"], "--out", str(tmp_path / "c.md")])
    assert res.exit_code == 0 and (tmp_path / "c.md").read_text().startswith("# Model card")
    res = runner.invoke(app, ["model", "card", world["v1"], "--out", str(tmp_path / "c.txt")])
    assert res.exit_code == 1 and "unknown model-card format" in res.output
