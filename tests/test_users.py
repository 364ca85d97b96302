"""Users, roles, passwords (scrypt) and API tokens (stored as SHA-256), with their audit events."""
from __future__ import annotations

import hashlib

import pytest
import typer
from app_db import dump_text, execute
from typer.testing import CliRunner

pytestmark = pytest.mark.app_databases  # SQLite and PostgreSQL


def _events(action):
    from compliance.audit import list_events

    return list_events(action=action)


def test_passwords_are_salted_scrypt_and_authenticate(cxr_env):
    from compliance.users import AuthenticationError, authenticate_password, create_user

    create_user("alice", "approver", "same-password-1", full_name="Alice Approver", actor="root")
    create_user("bob", "clinician", "same-password-1", actor="root")
    rows = dict(execute("SELECT name, password_hash FROM users"))
    assert all(h.startswith("scrypt$16384$8$1$") for h in rows.values())
    assert rows["alice"] != rows["bob"]  # per-user salt
    assert "same-password-1" not in " ".join(rows.values())

    user = authenticate_password("alice", "same-password-1")
    assert (user.name, user.role, user.full_name, user.active) == ("alice", "approver", "Alice Approver", True)
    with pytest.raises(AuthenticationError, match="wrong user name or password"):
        authenticate_password("alice", "nope-nope-nope")
    with pytest.raises(AuthenticationError, match="wrong user name or password"):
        authenticate_password("nobody", "nope-nope-nope")
    failed = _events("auth.login_failed")
    assert [(e["actor"], e["details"]["reason"]) for e in failed] == [("alice", "bad-password"),
                                                                       ("nobody", "unknown-user")]
    assert "nope-nope-nope" not in str(failed)
    created = _events("user.created")
    assert [(e["actor"], e["details"]) for e in created][0] == ("root", {"user": "alice", "role": "approver"})


def test_validation_roles_duplicates_and_short_passwords(cxr_env):
    from compliance.users import ROLES, UserError, create_user

    assert ROLES == ("clinician", "researcher", "approver", "compliance_officer", "admin")
    with pytest.raises(UserError, match="unknown role"):
        create_user("x1", "superuser", "long-enough-1")
    with pytest.raises(UserError, match="too short"):
        create_user("x1", "clinician", "short")
    with pytest.raises(UserError, match="invalid user name"):
        create_user("x 1", "clinician", "long-enough-1")
    create_user("x1", "clinician", "long-enough-1")
    with pytest.raises(UserError, match="already exists"):
        create_user("x1", "admin", "long-enough-1")


def test_lockout_after_repeated_failures_and_unlock(cxr_env):
    from compliance.users import MAX_FAILED_LOGINS, AuthenticationError, authenticate_password, create_user, unlock_user

    create_user("carol", "compliance_officer", "carol-password-1")
    for _ in range(MAX_FAILED_LOGINS):
        with pytest.raises(AuthenticationError):
            authenticate_password("carol", "guess-guess-guess")
    with pytest.raises(AuthenticationError, match="locked"):
        authenticate_password("carol", "carol-password-1")  # right password, locked account
    assert _events("auth.login_failed")[-1]["details"]["reason"] == "account-locked"
    unlock_user("carol", actor="root")
    assert authenticate_password("carol", "carol-password-1").name == "carol"


def test_tokens_hashed_revoked_expired_and_disabled_users(cxr_env):
    from compliance.users import (
        UserError,
        create_user,
        disable_user,
        issue_token,
        list_tokens,
        revoke_token,
        user_for_token,
    )

    create_user("dr-a", "clinician", "clinician-pw-1")
    t1 = issue_token("dr-a", actor="root")
    t2 = issue_token("dr-a", actor="root")
    assert t1 != t2 and t1.startswith("cxr_") and len(t1) > 40
    u = user_for_token(t1)
    assert u is not None and (u.name, u.role, u.active) == ("dr-a", "clinician", True)
    stored = [r[0] for r in execute("SELECT token_sha256 FROM api_tokens")]
    assert hashlib.sha256(t1.encode()).hexdigest() in stored
    dump = dump_text()
    assert hashlib.sha256(t1.encode()).hexdigest() in dump  # the dump does hold the stored rows
    assert t1 not in dump and t2 not in dump  # only hashes at rest
    assert user_for_token("cxr_forged") is None and user_for_token("") is None

    revoke_token(t1, actor="root")
    assert user_for_token(t1) is None and user_for_token(t2) is not None
    with pytest.raises(UserError, match="already revoked"):
        revoke_token(t1, actor="root")
    # revoke by public id
    t3 = issue_token("dr-a", actor="root")
    tid = [t for t in list_tokens("dr-a") if t["revoked_at"] is None][-1]["token_id"]
    assert tid == hashlib.sha256(t3.encode()).hexdigest()[:12]
    revoke_token(tid, actor="root")
    assert user_for_token(t3) is None

    # expiry
    execute("UPDATE api_tokens SET expires_at='2000-01-01T00:00:00Z' WHERE token_sha256=:h",
            {"h": hashlib.sha256(t2.encode()).hexdigest()})
    assert user_for_token(t2) is None

    # disabling the user invalidates every token and the password
    t4 = issue_token("dr-a", actor="root")
    disable_user("dr-a", actor="root")
    assert user_for_token(t4) is None
    with pytest.raises(UserError, match="disabled"):
        issue_token("dr-a", actor="root")
    assert [e["details"]["token_id"] for e in _events("token.revoked")][:1] == [hashlib.sha256(t1.encode()).hexdigest()[:12]]
    assert len(_events("token.issued")) == 4 and len(_events("user.disabled")) == 1


def test_require_role_denies_and_audits(cxr_env):
    from compliance.users import PermissionDenied, create_user, require_role

    create_user("rita", "researcher", "rita-password-1")
    assert require_role("rita", ["researcher"], action="train").name == "rita"
    with pytest.raises(PermissionDenied, match="role 'researcher'"):
        require_role("rita", ["approver"], action="model.approve", subject="model/covid-cxr/1")
    with pytest.raises(PermissionDenied, match="unknown user"):
        require_role("ghost", ["admin"], action="user.create")
    denied = _events("auth.permission_denied")
    assert [(e["actor"], e["details"]["action"]) for e in denied] == [("rita", "model.approve"), ("ghost", "user.create")]


def test_cli_users_and_tokens(cxr_env):
    from app.cli.governance import register
    from compliance.users import user_for_token

    app = typer.Typer()
    register(app)
    r = CliRunner()

    def run(args, user, stdin=None):
        return r.invoke(app, args, input=stdin, env={"CXR_USER": user})

    assert run(["users", "add", "boss", "--role", "admin", "--full-name", "Bo Boss", "--password-stdin"], "op",
               "boss-password-1\n").exit_code == 0
    assert run(["users", "add", "dr-b", "--role", "clinician", "--password-stdin"], "boss",
               "clinician-pw-1\n").exit_code == 0
    # token alone on stdout
    res = run(["tokens", "issue", "--user", "dr-b"], "boss")
    assert res.exit_code == 0, res.output
    token = res.stdout.strip()
    assert res.stdout == token + "\n" and user_for_token(token).name == "dr-b"
    # non-admins may not issue tokens, add or disable users
    res = run(["tokens", "issue", "--user", "dr-b"], "dr-b")
    assert res.exit_code == 1 and "permission denied" in res.output and "cxr_" not in res.stdout
    assert run(["users", "disable", "boss"], "dr-b").exit_code == 1
    # list shows users, never hashes
    res = run(["users", "list", "--json"], "dr-b")
    assert res.exit_code == 0 and "scrypt" not in res.output and '"dr-b"' in res.output
    res = run(["tokens", "revoke", token], "boss")
    assert res.exit_code == 0 and user_for_token(token) is None
    assert run(["users", "disable", "dr-b"], "boss").exit_code == 0
    res = run(["users", "disable", "dr-b"], "boss")
    assert res.exit_code == 1 and "already disabled" in res.output
    res = run(["users", "add", "dr-c", "--role", "clinician", "--password-stdin"], "boss", "")
    assert res.exit_code == 1 and "stdin is empty" in res.output
