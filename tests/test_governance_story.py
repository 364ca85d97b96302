"""Issue 4 "Must show": the whole governance story on a real MLflow registry and a real audit trail.

researcher's version → candidate; same person tries to approve → refused; an approver who trained
a version may not approve it (separation of duties); policy-failing version → refused; override
needs a reason and is recorded; passing version → champion alias in MLflow; roll-back; every step
in the audit trail; ``cxr audit verify`` OK via the CLI; tampering in SQLite → verify names the entry.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import typer
from _governance_fixtures import GOOD_EVALUATION, ensure_mlflow_db, failing_evaluation, make_version, mlflow_client
from app_db import execute
from typer.testing import CliRunner

pytestmark = pytest.mark.app_databases  # SQLite and PostgreSQL

PW = {"root": "root-velvet-harbor-19", "rita": "rita-copper-lantern-27", "alice": "alice-quiet-meadow-35",
      "carol": "carol-amber-thistle-48"}


def _cli() -> typer.Typer:
    from app.cli.governance import register

    app = typer.Typer()
    register(app)
    return app


def run(args, *, user=None, password=None, input_text=None):
    env = {"CXR_USER": user} if user else {}
    stdin = input_text if input_text is not None else (f"{password}\n" if password is not None else None)
    return CliRunner().invoke(_cli(), args, input=stdin, env=env)


def as_admin(args, new_password=None, *, admin="root"):
    """An admin action, authenticated: the admin's password, then (for add/passwd) the new password."""
    stdin = f"{PW[admin]}\n" + (f"{new_password}\n" if new_password is not None else "")
    extra = ["--as", admin, "--password-stdin"] + (["--new-password-stdin"] if new_password is not None else [])
    return CliRunner().invoke(_cli(), [*args, *extra], input=stdin, env={"CXR_USER": None, "CXR_TOKEN": None})


def champion(client) -> str:
    return str(client.get_model_version_by_alias("covid-cxr", "champion").version)


def _actions():
    from compliance.audit import list_events

    return [(e["action"], e["actor"], e["details"]) for e in list_events()]


def test_governance_story(cxr_env):
    from compliance.approvals import signatures, verify_signature

    # --- users (bootstrap rule: first user must be admin; afterwards only admins add users) ----------
    r = run(["users", "add", "rita", "--role", "researcher", "--new-password-stdin"], password=PW["rita"])
    assert r.exit_code != 0 and "first user must have role admin" in r.output
    r = run(["users", "add", "root", "--role", "admin", "--new-password-stdin"], password="password1234")
    assert r.exit_code != 0 and "password too weak" in r.output  # even the bootstrap admin
    assert run(["users", "add", "root", "--role", "admin", "--new-password-stdin"],
               password=PW["root"]).exit_code == 0  # bootstrap: no users yet, no credentials
    # afterwards a name is a claim, not an identity: --as root / CXR_USER=root without a credential is refused
    r = run(["users", "add", "eve", "--role", "admin", "--new-password-stdin"], user="root",
            password="eve-granite-orchid-52")
    assert r.exit_code != 0 and "needs an authenticated user" in r.output
    r = run(["users", "add", "eve", "--role", "admin", "--as", "root", "--password-stdin", "--new-password-stdin"],
            input_text="not-roots-password-1\neve-granite-orchid-52\n")
    assert r.exit_code != 0 and "authentication failed" in r.output
    for name, role, full in [("rita", "researcher", "Rita Researcher"), ("alice", "approver", "Alice Approver"),
                             ("carol", "compliance_officer", "Carol Compliance")]:
        r = as_admin(["users", "add", name, "--role", role, "--full-name", full], PW[name])
        assert r.exit_code == 0, r.output
    from compliance.users import get_user

    assert get_user("eve") is None
    # an approver cannot register a model under someone else's name: training needs that person's credentials
    from app.cli import root as cxr_root

    r = CliRunner().invoke(cxr_root, ["train", "--dataset", "any", "--as", "rita"], env={"CXR_TOKEN": None})
    assert r.exit_code == 1 and "needs an authenticated user" in r.output, r.output
    r = CliRunner().invoke(cxr_root, ["train", "--dataset", "any", "--as", "rita", "--password-stdin"],
                           input=PW["alice"] + "\n", env={"CXR_TOKEN": None})
    assert r.exit_code == 1 and "authentication failed" in r.output, r.output
    r = CliRunner().invoke(cxr_root, ["train", "--dataset", "any", "--as", "alice", "--password-stdin"],
                           input=PW["alice"] + "\n", env={"CXR_TOKEN": None})
    assert r.exit_code == 1 and "permission denied" in r.output and "researcher" in r.output, r.output

    # --- researcher's versions are candidates ------------------------------------------------------------
    v_good = make_version(GOOD_EVALUATION, trained_by="rita")
    v_fail = make_version(failing_evaluation(), trained_by="rita")
    v_good2 = make_version(GOOD_EVALUATION, trained_by="rita", git_commit="89abcdef")
    v_alice = make_version(GOOD_EVALUATION, trained_by="alice", registered_by="rita")
    client = mlflow_client()
    assert client.get_model_version("covid-cxr", v_good).tags["status"] == "candidate"

    # policy check prints each criterion with measured value and pass/fail; exit code = verdict
    r = run(["model", "check", v_good], user="rita")
    assert r.exit_code == 0, r.output
    assert "covid19-sensitivity-lower-bound" in r.output and "PASS" in r.output
    r = run(["model", "check", v_fail], user="rita")
    assert r.exit_code == 1
    assert "FAIL" in r.output and "external-validation" in r.output

    # --- same person (the researcher who trained it) tries to approve → refused --------------------------
    r = run(["model", "approve", v_good, "--reason", "looks fine to me", "--as", "rita", "--password-stdin"],
            password=PW["rita"])
    assert r.exit_code != 0 and "permission denied" in r.output and "Traceback" not in r.output
    # an approver who trained a version may not approve it (separation of duties)
    r = run(["model", "approve", v_alice, "--reason", "my own model", "--as", "alice", "--password-stdin"],
            password=PW["alice"])
    assert r.exit_code != 0 and "separation of duties" in r.output
    # wrong password at signing → refused and audited
    r = run(["model", "approve", v_good, "--reason", "meets policy", "--as", "alice", "--password-stdin"],
            password="not-her-password")
    assert r.exit_code != 0 and "authentication failed" in r.output

    # --- approver approves a policy-failing version → refused -----------------------------------------
    r = run(["model", "approve", v_fail, "--reason", "urgent need", "--as", "alice", "--password-stdin"],
            password=PW["alice"])
    assert r.exit_code != 0 and "fails release policy" in r.output
    assert client.get_model_version("covid-cxr", v_fail).tags["status"] == "candidate"
    assert "champion" not in client.get_registered_model("covid-cxr").aliases

    # --- approver approves a passing version → champion ------------------------------------------------
    r = run(["model", "approve", v_good, "--reason", "meets release policy 2.0.0", "--as", "alice",
             "--password-stdin"], password=PW["alice"])
    assert r.exit_code == 0, r.output
    assert champion(client) == v_good
    tags = client.get_model_version("covid-cxr", v_good).tags
    assert tags["status"] == "approved" and tags["approved_by"] == "alice"
    assert tags["approved_by_name"] == "Alice Approver" and tags["approval_meaning"] == "approved for clinical use"
    assert tags["policy_override"] == "false" and len(tags["approval_evaluation_sha256"]) == 64

    # --- override: needs a reason, and is recorded as an override ----------------------------------------
    r = run(["model", "approve", v_fail, "--reason", "pandemic surge", "--as", "alice", "--password-stdin",
             "--override-policy", "  "], password=PW["alice"])
    assert r.exit_code != 0 and "policy-override reason is required" in r.output
    r = run(["model", "approve", v_fail, "--reason", "pandemic surge", "--as", "alice", "--password-stdin",
             "--override-policy", "external site data pending; emergency use board decision 12"], password=PW["alice"])
    assert r.exit_code == 0, r.output
    assert "POLICY OVERRIDE" in r.output
    assert champion(client) == v_fail
    assert client.get_model_version("covid-cxr", v_fail).tags["policy_override"] == "true"

    # --- rollback: champion back to the previous approved version, signed -------------------------------
    r = run(["model", "rollback", "--reason", "override withdrawn after review", "--as", "alice", "--password-stdin"],
            password=PW["alice"])
    assert r.exit_code == 0, r.output
    assert champion(client) == v_good
    assert client.get_model_version("covid-cxr", v_fail).tags["status"] == "retired"
    # a newer passing version, then a second roll-back skips the retired one
    assert run(["model", "approve", v_good2, "--reason", "meets release policy 2.0.0", "--as", "alice",
                "--password-stdin"], password=PW["alice"]).exit_code == 0
    assert run(["model", "rollback", "--reason", "regression at site A", "--as", "alice", "--password-stdin"],
               password=PW["alice"]).exit_code == 0
    assert champion(client) == v_good
    # the champion cannot be retired; the SoD-barred version can be rejected
    r = run(["model", "retire", v_good, "--reason", "old model", "--as", "alice", "--password-stdin"],
            password=PW["alice"])
    assert r.exit_code != 0 and "is the champion" in r.output
    assert run(["model", "reject", v_alice, "--reason", "superseded by version 1", "--as", "alice",
                "--password-stdin"], password=PW["alice"]).exit_code == 0

    # --- e-signatures: printed name, UTC time, meaning, reason, policy version, evaluation hash ------------
    sigs = signatures(v_good)
    assert sigs[0]["signer_full_name"] == "Alice Approver" and sigs[0]["meaning"] == "approved for clinical use"
    assert sigs[0]["time_utc"].endswith("Z") and sigs[0]["policy_version"] == "2.1.0"
    assert sigs[0]["evaluation_sha256"] == tags["approval_evaluation_sha256"]
    override_sig = [s for s in signatures(v_fail) if s["action"] == "approve"][0]
    assert override_sig["policy_passed"] is False and "emergency use" in override_sig["policy_override_reason"]
    assert all(verify_signature(s) for s in signatures())

    # --- every step in the audit trail ------------------------------------------------------------------
    acts = _actions()
    names = [a for a, _, _ in acts]
    for needed in ("user.created", "policy.checked", "auth.permission_denied", "auth.login_failed",
                   "model.decision_refused", "model.approved", "alias.changed", "model.rolled_back",
                   "model.rejected"):
        assert needed in names, needed
    denied = [d for a, actor, d in acts if a == "auth.permission_denied"]
    assert any(d.get("reason") == "separation-of-duties" for d in denied)
    assert any(d.get("action") == "model.approve" and "researcher" in d.get("reason", "") for d in denied)
    refused = [d for a, _, d in acts if a == "model.decision_refused"]
    assert any(d["code"] == "policy-failed" and d["version"] == v_fail for d in refused)
    approved = [d for a, _, d in acts if a == "model.approved"]
    assert [d["version"] for d in approved] == [v_good, v_fail, v_good2]
    assert approved[1]["policy_override"] is True
    assert approved[1]["e_signature"]["policy_override_reason"].startswith("external site data pending")
    moves = [(d["from_version"], d["to_version"]) for a, _, d in acts if a == "alias.changed"]
    assert moves == [(None, v_good), (v_good, v_fail), (v_fail, v_good), (v_good, v_good2), (v_good2, v_good)]
    assert not any("password" in str(d).lower() and PW["alice"] in str(d) for _, _, d in acts)

    # --- cxr audit verify OK (in-process CLI and the real console entry point) ---------------------------
    r = run(["audit", "verify"])
    assert r.exit_code == 0 and "audit chain intact" in r.output and "e-signatures: all verify" in r.output
    env = {**os.environ, "CXR_HOME": str(cxr_env / "home"), "CXR_PROJECT_ROOT": str(cxr_env / "project")}
    proc = subprocess.run([sys.executable, "-c", "from app.cli import main; main()", "audit", "verify"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "audit chain intact" in proc.stdout

    # --- tamper directly in the database: verify fails and names the entry ------------------------------
    from compliance.audit import list_events

    seq = list_events(action="model.approved")[0]["seq"]
    # (a) the signature row alone is edited: the chain is intact but the signature no longer verifies
    execute("UPDATE e_signatures SET reason='rubber stamp' WHERE version=:v AND action='approve'", {"v": v_good})
    r = run(["audit", "verify"])
    assert r.exit_code == 1 and "E-SIGNATURE INVALID" in r.output and f"audit entry {seq}" in r.output
    assert not verify_signature(signatures(v_good)[0])
    # (b) the audit entry itself is edited to match: the chain names the entry
    execute("UPDATE audit_trail SET details=replace(details, 'meets release policy', 'rubber stamp') WHERE seq=:s",
            {"s": seq})
    r = run(["audit", "verify"])
    assert r.exit_code == 1
    assert "AUDIT CHAIN BROKEN" in r.output and f"entry {seq}:" in r.output and "Traceback" not in r.output
    # (c) a signature row deleted: its signing audit entry reports it missing
    from compliance.approvals import verify_signatures

    execute("DELETE FROM e_signatures WHERE version=:v AND action='reject'", {"v": v_alice})
    assert any("missing (deleted)" in p["problem"] for p in verify_signatures())


def test_unknown_version_and_bad_input_fail_cleanly(cxr_env):
    ensure_mlflow_db()
    assert run(["users", "add", "root", "--role", "admin", "--new-password-stdin"],
               password=PW["root"]).exit_code == 0
    r = run(["model", "check", "42"], user="root")
    assert r.exit_code == 1 and "not found" in r.output and "Traceback" not in r.output
    r = run(["model", "approve", "champion", "--reason", "x" * 10, "--as", "root", "--password-stdin"], password="pw")
    assert r.exit_code == 1 and "not found" in r.output
    r = as_admin(["users", "add", "bad name!", "--role", "admin"], "long-enough-quartz-1")
    assert r.exit_code == 1 and "invalid user name" in r.output
    r = as_admin(["users", "add", "x1", "--role", "wizard"], "long-enough-quartz-1")
    assert r.exit_code == 1 and "unknown role" in r.output
    r = as_admin(["audit", "export", "--from", "2026-13-01", "--to", "2026-12-01", "--format", "json", "--out",
                  "r.json"])
    assert r.exit_code == 1 and "invalid date" in r.output


def test_policy_criteria_measured_values_and_external_artifacts(cxr_env):
    """Each criterion reports measured value, threshold and verdict; external validation may come from
    evaluation.json['external'] or from separately logged evaluation/external/<dataset>.json artefacts."""
    import copy

    from compliance.audit import list_events
    from compliance.policy import check_release_policy

    bad = check_release_policy(make_version(failing_evaluation()), actor="qa")
    by_id = {c.id: c for c in bad.criteria}
    assert not bad.passed and bad.policy_version == "2.1.0"
    assert (by_id["covid19-sensitivity-lower-bound"].measured, by_id["covid19-sensitivity-lower-bound"].threshold,
            by_id["covid19-sensitivity-lower-bound"].passed) == (0.41, 0.70, False)
    assert by_id["covid19-auroc-lower-bound"].passed and by_id["calibration-covid19-ece"].passed
    assert not by_id["minimum-test-patients"].passed and not by_id["external-validation"].passed
    assert {c.id for c in bad.failed} == {"covid19-sensitivity-lower-bound", "minimum-test-patients",
                                          "external-validation"}

    no_ext = copy.deepcopy(GOOD_EVALUATION)
    no_ext.pop("external")
    ext = {"n_patients": 25, "external": True, "provenance": {"is_external": True, "reasons": []},
           "covid19_vs_rest": {"auroc": {"value": 0.8, "ci_low": 0.72, "ci_high": 0.88}}}
    ok = check_release_policy(make_version(no_ext, external_artifacts={"site-c": ext}), actor="qa")
    assert ok.passed, [(c.id, c.measured, c.note) for c in ok.failed]
    assert set(ok.external_sha256) == {"site-c"}
    weak = dict(ext, covid19_vs_rest={"auroc": {"value": 0.7, "ci_low": 0.6, "ci_high": 0.8}})
    res = check_release_policy(make_version(no_ext, external_artifacts={"site-c": ext, "site-d": weak}), record=False)
    ext_result = {c.id: c for c in res.criteria}["external-validation"]
    assert not res.passed and ext_result.measured == 0.6 and "site-d=0.6" in ext_result.note
    # lineage tags are required
    res = check_release_policy(make_version(GOOD_EVALUATION, git_commit=""), record=False)
    assert [c.id for c in res.failed] == ["lineage-recorded"]
    # a version without evaluation fails with a reason (and cannot be approved even with an override)
    v_none = make_version(None)
    res = check_release_policy(v_none, actor="qa")
    assert not res.passed and "evaluation/evaluation.json not found" in res.error
    from compliance.approvals import ApprovalRefused, approve_model_version
    from compliance.users import create_user

    create_user("alice", "approver", PW["alice"])
    with pytest.raises(ApprovalRefused, match="without an evaluation"):
        approve_model_version(v_none, approver="alice", password=PW["alice"], reason="trust me please",
                              override_policy_reason="no evaluation but urgent")
    checked = list_events(action="policy.checked")
    assert len(checked) == 4 and checked[0]["details"]["measured"]["minimum-test-patients"] == 12
