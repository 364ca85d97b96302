"""Issue 15: an audit trail anchored outside the database.

An attacker here can write the app database (SQLite, by hand) but holds neither the audit key
(CXR_HOME/secrets/audit-keys, 0600) nor the checkpoint file (CXR_HOME/audit-checkpoints). Every test
attacks the real trail the way the review did and expects ``cxr audit verify`` (the real CLI
command) or ``GET /v1/audit/verify`` to fail naming what it caught.
"""
from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from _governance_fixtures import GOOD_EVALUATION, make_version
from typer.testing import CliRunner

PW = {"root": "root-password-1", "alice": "alice-password-1", "carol": "carol-password-1"}


def _db(env: Path) -> sqlite3.Connection:
    return sqlite3.connect(env / "home" / "cxr.db")


def _cli() -> typer.Typer:
    from app.cli.governance import register

    app = typer.Typer()
    register(app)
    return app


def verify_cli():
    return CliRunner().invoke(_cli(), ["audit", "verify"])


def _events(n: int, action: str = "dataset.imported") -> None:
    from compliance.audit import record_event

    for i in range(n):
        record_event(action, actor="rita", role="researcher", subject=f"dataset/d{i}", details={"n": i})


def _plain_rehash(con: sqlite3.Connection, from_seq: int = 1, edit=None) -> None:
    """What a DB-only attacker can do: rewrite rows and recompute every hash with the public function
    (plain SHA-256), clearing the key id so the rows look like a plain chain."""
    from compliance.audit import GENESIS_HASH, compute_entry_hash

    rows = con.execute("SELECT seq,time_utc,actor,role,action,subject,details,prev_hash,entry_hash,key_id "
                       "FROM audit_trail ORDER BY seq").fetchall()
    prev = GENESIS_HASH
    for seq, t, actor, role, action, subject, details, _p, h, kid in rows:
        if seq < from_seq:
            prev = h
            continue
        if edit:
            actor, details = edit(seq, actor, details)
        h = compute_entry_hash(seq, t, actor, role, action, subject, details, prev, key=None, key_id=None)
        con.execute("UPDATE audit_trail SET actor=?, details=?, prev_hash=?, entry_hash=?, key_id=NULL WHERE seq=?",
                    (actor, details, prev, h, seq))
        prev = h
    con.commit()


# --------------------------------------------------------------------------------------------- keys
def test_key_is_created_private_outside_the_db_and_named_per_entry(cxr_env):
    from compliance.audit import list_events, verify_chain

    _events(3)
    key_dir = cxr_env / "home" / "secrets" / "audit-keys"
    keys = list(key_dir.glob("*.key"))
    assert len(keys) == 1
    assert stat.S_IMODE(keys[0].stat().st_mode) == 0o600
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    key_text = keys[0].read_text().strip()
    ids = {e["key_id"] for e in list_events()}
    assert len(ids) == 1 and ids.pop().startswith("k-")
    con = _db(cxr_env)
    dump = "\n".join(con.iterdump())
    con.close()
    assert key_text not in dump  # the key never enters the database
    v = verify_chain()
    assert v.ok and v.mode == "keyed" and v.checkpoint["seq"] == 3


def test_every_writer_process_shares_one_key(cxr_env):
    """Four processes (like the API, the CLI and training) append at once to a fresh installation:
    exactly one key is created and the interleaved chain verifies."""
    code = ("from compliance.audit import record_event\n"
            "import sys\n"
            "for i in range(5): record_event('test.concurrent', actor='p'+sys.argv[1], role='researcher', details={'i': i})\n")
    env = {**os.environ, "CXR_HOME": str(cxr_env / "home"), "CXR_PROJECT_ROOT": str(cxr_env / "project"),
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    from core.db import get_engine

    get_engine()  # the schema exists (concurrent first-time schema creation is not what is tested here)
    assert not (cxr_env / "home" / "secrets" / "audit-keys").exists()
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], env=env) for i in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    from compliance.audit import list_events, verify_chain

    assert len(list((cxr_env / "home" / "secrets" / "audit-keys").glob("*.key"))) == 1
    assert len({e["key_id"] for e in list_events()}) == 1
    v = verify_chain()
    assert v.ok and v.n_entries == 20, v.message


def test_rotation_keeps_old_entries_verifiable_and_a_missing_key_is_named(cxr_env):
    from compliance.audit import list_events, verify_chain
    from compliance.audit_anchor import rotate_key

    _events(2)
    new_id = rotate_key()
    _events(2)
    ids = [e["key_id"] for e in list_events()]
    assert ids[-1] == new_id and ids[0] != new_id
    assert verify_chain().ok
    # the old key is lost (not escrowed): a clear "unverifiable", naming the key, not "entry edited"
    old = [p for p in (cxr_env / "home" / "secrets" / "audit-keys").glob("*.key") if new_id not in p.name][0]
    old.rename(cxr_env / "escrow.key")
    v = verify_chain()
    assert not v.ok and v.status == "unverifiable"
    assert ids[0] in v.message and "not available" in v.message and "edited" not in v.message
    r = verify_cli()
    assert r.exit_code == 1 and "UNVERIFIABLE" in r.output and ids[0] in r.output
    (cxr_env / "escrow.key").rename(old)
    assert verify_chain().ok


# ------------------------------------------------------------------------------------ DB-only attacker
def test_plain_recomputed_chain_is_detected_in_keyed_mode(cxr_env):
    """The review's attack: rewrite an entry (author of an event) and recompute the whole chain with plain
    SHA-256. Every link is consistent, yet keyed verification fails at the checkpoints."""
    _events(4)
    con = _db(cxr_env)
    _plain_rehash(con, edit=lambda seq, actor, d: ("mallory" if seq == 2 else actor, d))
    con.close()
    from compliance.audit import verify_chain

    v = verify_chain()
    assert not v.ok and v.status == "broken"
    assert "checkpoint" in v.message and "disagrees" in v.message
    r = verify_cli()
    assert r.exit_code == 1 and "AUDIT CHAIN BROKEN" in r.output and "checkpoints.jsonl:" in r.output


def test_forged_approval_appended_with_plain_hash_is_detected(cxr_env):
    """A fake ``model.approved`` entry plus its ``e_signatures`` row, hashed with the public functions."""
    from compliance.approvals import signature_hash
    from compliance.audit import canonical_json, compute_entry_hash, verify_chain

    _events(3)
    con = _db(cxr_env)
    seq, prev = con.execute("SELECT seq, entry_hash FROM audit_trail ORDER BY seq DESC LIMIT 1").fetchone()
    sig = {"id": "00000000-0000-0000-0000-000000000001", "model": "covid-cxr", "version": "9", "action": "approve",
           "meaning": "approved for clinical use", "signer_name": "alice", "signer_full_name": "Alice",
           "signer_role": "approver", "time_utc": "2026-01-01T00:00:00Z", "reason": "rubber stamp",
           "policy_version": "1.0.0", "policy_passed": True, "policy_override_reason": None,
           "evaluation_sha256": "0" * 64, "from_version": None, "artifact_sha256": "1" * 64}
    sig["signature_sha256"] = signature_hash(sig)
    details = canonical_json({"model": "covid-cxr", "version": "9", "e_signature": sig})
    t = "2026-01-01T00:00:00.000000Z"
    h = compute_entry_hash(seq + 1, t, "alice", "approver", "model.approved", "model/covid-cxr/9", details, prev)
    con.execute("INSERT INTO audit_trail (seq,time_utc,actor,role,action,subject,details,prev_hash,entry_hash) "
                "VALUES (?,?,?,?,?,?,?,?,?)", (seq + 1, t, "alice", "approver", "model.approved", "model/covid-cxr/9",
                                               details, prev, h))
    con.execute("INSERT INTO e_signatures (id,model,version,action,meaning,signer_name,signer_full_name,signer_role,"
                "time_utc,reason,policy_version,policy_passed,evaluation_sha256,artifact_sha256,signature_sha256,"
                "audit_seq,audit_entry_hash) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (sig["id"], "covid-cxr", "9", "approve", sig["meaning"], "alice", "Alice", "approver", sig["time_utc"],
                 "rubber stamp", "1.0.0", 1, "0" * 64, "1" * 64, sig["signature_sha256"], seq + 1, h))
    con.commit()
    con.close()
    v = verify_chain()
    assert not v.ok and v.first_bad_seq == seq + 1 and "without the audit key" in v.message
    # and serving does not accept the forged signature either
    from compliance.approvals import serving_approval

    ok = serving_approval("9")
    assert not ok.ok and ok.reason == "signature-invalid"


def test_entry_with_real_key_id_but_wrong_mac_is_detected(cxr_env):
    _events(3)
    con = _db(cxr_env)
    con.execute("UPDATE audit_trail SET details='{\"n\":42}' WHERE seq=2")
    con.commit()
    con.close()
    from compliance.audit import verify_chain

    v = verify_chain()
    assert not v.ok and v.first_bad_seq == 2 and "entry 2: content does not match" in v.message


def _setup_governance(env):
    from compliance.users import create_user

    create_user("root", "admin", PW["root"], full_name="Root Admin", actor="bootstrap")
    create_user("alice", "approver", PW["alice"], full_name="Alice Approver", actor="root")
    create_user("carol", "compliance_officer", PW["carol"], full_name="Carol Compliance", actor="root")


def test_deleting_newest_entries_with_an_approval_is_detected_naming_the_checkpoint(cxr_env):
    """Tail truncation: the newest entries (an approval, its alias move) and the signature row are deleted
    in SQL. The chain that remains is internally perfect; the checkpoint outside the database is not."""
    from compliance.approvals import approve_model_version
    from compliance.audit import list_events

    _setup_governance(cxr_env)
    v1 = make_version(GOOD_EVALUATION, trained_by="rita")
    approve_model_version(v1, approver="alice", password=PW["alice"], reason="meets release policy 1.0.0")
    r = verify_cli()
    assert r.exit_code == 0, r.output
    assert "checkpoint: agrees with" in r.output
    approved = list_events(action="model.approved")[-1]["seq"]
    last = list_events()[-1]["seq"]
    con = _db(cxr_env)
    con.execute("DELETE FROM audit_trail WHERE seq >= ?", (approved,))
    con.execute("DELETE FROM e_signatures")
    con.commit()
    con.close()
    r = verify_cli()
    assert r.exit_code == 1, r.output
    out = " ".join(r.output.split())
    assert "AUDIT CHAIN BROKEN" in out and f"at entry {approved}" in out
    assert "checkpoints.jsonl:" in out and f"records entry {last}" in out
    assert f"trail ends at entry {approved - 1}" in out and "were deleted" in out
    # the JSON form names the checkpoint too
    r = CliRunner().invoke(_cli(), ["audit", "verify", "--json"])
    doc = json.loads(r.output)
    assert doc["ok"] is False and any("checkpoints.jsonl" in p for p in doc["problems"])


def test_checkpoint_file_lines_are_keyed(cxr_env):
    from compliance.audit import verify_chain
    from compliance.audit_anchor import checkpoint_path

    _events(3)
    path = checkpoint_path()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(x)["key_id"].startswith("k-") for x in lines)
    # a forged checkpoint (an attacker who can write the file but has no key) is reported, not trusted
    forged = json.loads(lines[-1])
    forged["seq"] = 2
    path.write_text("\n".join(lines + [json.dumps(forged)]) + "\n")
    v = verify_chain()
    assert not v.ok and "MAC does not verify" in v.message


def test_api_checkpointer_covers_high_volume_entries(cxr_env):
    from app.services.audit_checkpoints import AuditCheckpointer
    from compliance.audit import record_event
    from compliance.audit_anchor import read_checkpoints

    _events(1)
    record_event("api.request", actor="x", role="clinician", details={"route": "/v1/model"})
    assert [c.seq for c in read_checkpoints()[1]] == [1]  # exempt actions do not checkpoint each
    cp = AuditCheckpointer(60)
    cp.tick()
    cp.tick()  # head unchanged: no second line
    assert [c.seq for c in read_checkpoints()[1]] == [1, 2]


def test_plain_mode_is_an_explicit_opt_out(cxr_env, monkeypatch):
    from compliance.audit import list_events, verify_chain
    from core.config import reset_settings

    monkeypatch.setenv("CXR_AUDIT_MODE", "plain")
    reset_settings()
    _events(2)
    assert {e["key_id"] for e in list_events()} == {None}
    assert not (cxr_env / "home" / "secrets" / "audit-keys").exists()
    v = verify_chain()
    assert v.ok and v.mode == "plain"
    # even plain, the checkpoint outside the database catches a truncated tail
    con = _db(cxr_env)
    con.execute("DELETE FROM audit_trail WHERE seq = 2")
    con.commit()
    con.close()
    v = verify_chain()
    assert not v.ok and "were deleted" in v.message


# ------------------------------------------------------------------------------------------- rows
def _stored_prediction(pid: str, created_at: str = "2026-11-01T10:00:00.000000Z"):
    from app import storage
    from compliance.audit import record_event

    row = {"id": pid, "created_at": created_at, "model_name": "covid-cxr", "model_version": "1", "site": "ward-3",
           "accession_hash": None, "requested_by": "dr", "probabilities": {"covid19": 0.8, "normal": 0.1,
                                                                           "other_pneumonia": 0.1},
           "p_covid19": 0.8, "operating_threshold": 0.42, "decision": "covid19-positive", "ood_score": 0.3,
           "warnings": [], "vitals_present": {"spo2_percent": True}, "view": "PA"}
    _, h = storage.save_prediction_sealed(row)
    record_event("prediction.served", actor="dr", role="clinician", subject=f"prediction/{pid}",
                 details={"prediction_id": pid, "row_sha256": h})
    out, oh = storage.save_outcome_sealed({"prediction_id": pid, "confirmed_class": "covid19", "rtpcr_result": "positive",
                                           "truth_positive": True, "recorded_by": "dr",
                                           "recorded_at": "2026-11-02T10:00:00.000000Z"})
    record_event("outcome.recorded", actor="dr", role="clinician", subject=f"prediction/{pid}",
                 details={"prediction_id": pid, "outcome_id": out["id"], "row_sha256": oh})


@pytest.mark.parametrize("sql, needle", [
    ("UPDATE predictions SET decision='covid19-negative', p_covid19=0.1 WHERE id='p-2'", "prediction row p-2 does not match"),
    ("UPDATE outcomes SET confirmed_class='normal', truth_positive=0 WHERE prediction_id='p-1'", "outcome row 1 does not match"),
    ("UPDATE outcomes SET recorded_by='mallory' WHERE prediction_id='p-2'", "outcome row 2 does not match"),
    ("DELETE FROM predictions WHERE id='p-1'", "prediction row p-1 it records is missing"),
    ("INSERT INTO predictions (id, created_at, model_name, model_version, site, accession_hash, requested_by, "
     "probabilities, p_covid19, operating_threshold, decision, ood_score, warnings, vitals_present, view) "
     "SELECT 'p-9', created_at, model_name, model_version, site, accession_hash, requested_by, "
     "probabilities, p_covid19, operating_threshold, decision, ood_score, warnings, vitals_present, view FROM predictions "
     "WHERE id='p-1'", "prediction row p-9 has no prediction.served audit entry"),
])
def test_edited_prediction_and_outcome_rows_are_detected(cxr_env, sql, needle):
    from compliance.audit import verify_chain

    _stored_prediction("p-1")
    _stored_prediction("p-2")
    v = verify_chain()
    assert v.ok and v.rows["predictions_verified"] == 2 and v.rows["outcomes_verified"] == 2
    con = _db(cxr_env)
    con.execute("PRAGMA foreign_keys=OFF")
    con.execute(sql)
    con.commit()
    con.close()
    v = verify_chain()
    assert not v.ok
    assert any(needle in p for p in v.problems), v.problems
    r = verify_cli()
    assert r.exit_code == 1 and needle.split(" does")[0].split(" it")[0] in " ".join(r.output.split())


# --------------------------------------------------------------------------------------- periods
def test_period_filters_compare_times_not_strings(cxr_env):
    """An event 0.5 s after midnight belongs to the day that starts there ("…00.500000Z" < "…00Z" as text)."""
    from compliance.audit import list_events
    from compliance.reports import _predictions

    _events(3)
    con = _db(cxr_env)
    con.execute("UPDATE audit_trail SET time_utc='2026-11-30T00:00:00.500000Z' WHERE seq=1")
    con.execute("UPDATE audit_trail SET time_utc='2026-11-29T23:59:59.999999Z' WHERE seq=2")
    con.execute("UPDATE audit_trail SET time_utc='2026-11-30T00:00:00Z' WHERE seq=3")
    con.commit()
    con.close()
    november = [e["seq"] for e in list_events("2026-11-01T00:00:00Z", "2026-11-30T00:00:00Z")]
    last_day = [e["seq"] for e in list_events("2026-11-30T00:00:00Z", "2026-12-01T00:00:00Z")]
    assert november == [2]
    assert sorted(last_day) == [1, 3]
    assert [e["seq"] for e in list_events("2026-11-30T00:00:00+01:00", "2026-11-30T00:00:00Z")] == [2]
    _stored_prediction("p-edge", created_at="2026-12-01T00:00:00.250000Z")
    volume, _ = _predictions("2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z")
    assert volume["total"] == 0
    volume, accuracy = _predictions("2026-12-01T00:00:00Z", "2026-12-02T00:00:00Z")
    assert volume["total"] == 1 and accuracy["rows"][0]["tp"] == 1


# ----------------------------------------------------------------------------- GET /v1/audit/verify
def test_api_verify_checks_e_signatures_like_the_cli(cxr_env):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.services.champion import ModelService
    from compliance.approvals import approve_model_version
    from compliance.users import issue_token

    _setup_governance(cxr_env)
    v1 = make_version(GOOD_EVALUATION, trained_by="rita")
    approve_model_version(v1, approver="alice", password=PW["alice"], reason="meets release policy 1.0.0")
    token = issue_token("carol", actor="root")
    svc = ModelService(poll_seconds=3600, resolver=lambda: None)
    with TestClient(create_app(model_service=svc)) as c:
        h = {"Authorization": f"Bearer {token}"}
        body = c.get("/v1/audit/verify", headers=h).json()
        assert body["ok"] is True and body["signature_problems"] == [] and body["checkpoint"]["seq"] >= 1
        con = _db(cxr_env)
        con.execute("UPDATE e_signatures SET reason='rubber stamp'")
        con.commit()
        con.close()
        body = c.get("/v1/audit/verify", headers=h).json()
        assert body["ok"] is False and body["chain_ok"] is True
        assert body["signature_problems"] and "altered" in body["signature_problems"][0]["problem"]
        assert "e-signature" in body["message"]
