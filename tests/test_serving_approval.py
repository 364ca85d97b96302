"""Issue 15: what serving asks governance (``compliance.approvals.serving_approval``), on a real MLflow
registry without training: the approval signs the artefact digest; an alias moved in MLflow, a
revoked approval, or a version only tagged ``approved`` is not servable."""
from __future__ import annotations

from _governance_fixtures import GOOD_EVALUATION, make_version, mlflow_client

PW = {"alice": "alice-password-1"}


def _approver():
    from compliance.users import create_user

    create_user("root", "admin", "root-password-1", full_name="Root", actor="bootstrap")
    create_user("alice", "approver", PW["alice"], full_name="Alice Approver", actor="root")


def _approve(v):
    from compliance.approvals import approve_model_version

    return approve_model_version(v, approver="alice", password=PW["alice"], reason="meets release policy 1.0.0")


def test_approval_signs_the_artefact_digest(cxr_env):
    from compliance.approvals import serving_approval, signatures, verify_signature
    from models.registry import artifact_sha256

    _approver()
    v1 = make_version(GOOD_EVALUATION)
    res = _approve(v1)
    sig = signatures(v1)[0]
    assert sig["artifact_sha256"] == artifact_sha256(v1) and len(sig["artifact_sha256"]) == 64
    assert res["signature"]["artifact_sha256"] == sig["artifact_sha256"]
    assert mlflow_client().get_model_version("covid-cxr", v1).tags["approval_artifact_sha256"] == sig["artifact_sha256"]
    assert verify_signature(sig, strict=True)
    ok = serving_approval(v1)
    assert ok.ok and ok.artifact_sha256 == sig["artifact_sha256"]
    # the digest is part of what is signed: changing it in the row breaks the signature
    import sqlite3

    con = sqlite3.connect(cxr_env / "home" / "cxr.db")
    con.execute("UPDATE e_signatures SET artifact_sha256=? WHERE version=?", ("f" * 64, v1))
    con.commit()
    con.close()
    bad = serving_approval(v1)
    assert not bad.ok and bad.reason == "signature-invalid"


def test_alias_moves_outside_governance_and_revocations_are_not_servable(cxr_env):
    from compliance.approvals import rollback_champion, serving_approval

    _approver()
    v1, v2 = make_version(GOOD_EVALUATION), make_version(GOOD_EVALUATION, git_commit="89abcdef")
    v3 = make_version(GOOD_EVALUATION, git_commit="fedcba98")
    _approve(v1)
    _approve(v2)
    assert serving_approval(v2).ok
    # v1 was approved, but governance last moved champion to v2: a direct MLflow move is refused
    mlf = mlflow_client()
    mlf.set_registered_model_alias("covid-cxr", "champion", v1)
    r = serving_approval(v1)
    assert not r.ok and r.reason == "alias-not-governed" and r.artifact_sha256
    # an unapproved version, even tagged approved in MLflow
    mlf.set_model_version_tag("covid-cxr", v3, "status", "approved")
    assert serving_approval(v3).reason == "no-approval"
    # a signed roll-back back to v1 makes v1 servable and revokes v2
    mlf.set_registered_model_alias("covid-cxr", "champion", v2)
    rollback_champion(approver="alice", password=PW["alice"], reason="regression at site A")
    assert serving_approval(v1).ok
    r = serving_approval(v2)
    assert not r.ok and r.reason == "revoked"
