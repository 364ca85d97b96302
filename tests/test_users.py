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

    create_user("alice", "approver", "same-harbor-pencil-61", full_name="Alice Approver", actor="root")
    create_user("bob", "clinician", "same-harbor-pencil-61", actor="root")
    rows = dict(execute("SELECT name, password_hash FROM users"))
    assert all(h.startswith("scrypt$16384$8$1$") for h in rows.values())
    assert rows["alice"] != rows["bob"]  # per-user salt
    assert "same-harbor-pencil-61" not in " ".join(rows.values())

    user = authenticate_password("alice", "same-harbor-pencil-61")
    assert (user.name, user.role, user.full_name, user.active) == ("alice", "approver", "Alice Approver", True)
    with pytest.raises(AuthenticationError) as wrong:
        authenticate_password("alice", "nope-nope-nope")
    with pytest.raises(AuthenticationError) as unknown:
        authenticate_password("nobody", "nope-nope-nope")
    assert str(wrong.value) == str(unknown.value) == "authentication failed: wrong user name or password, " \
        "or the account is locked or disabled"
    failed = _events("auth.login_failed")
    assert [(e["actor"], e["details"]["reason"]) for e in failed] == [("alice", "bad-password"),
                                                                       ("nobody", "unknown-user")]
    assert "nope-nope-nope" not in str(failed)
    created = _events("user.created")
    assert [(e["actor"], e["details"]) for e in created][0] == ("root", {"user": "alice", "role": "approver",
                                                                          "sites": []})


def test_validation_roles_duplicates_and_short_passwords(cxr_env):
    from compliance.users import ROLES, UserError, create_user

    assert ROLES == ("clinician", "researcher", "approver", "compliance_officer", "admin")
    with pytest.raises(UserError, match="unknown role"):
        create_user("x1", "superuser", "long-enough-quartz-1")
    with pytest.raises(UserError, match="too short"):
        create_user("x1", "clinician", "short")
    with pytest.raises(UserError, match="too short"):
        create_user("x1", "clinician", "Kq7#mZ2!pL9")  # 11 characters, however random
    for common in ("password1234", "qwertyuiop123", "Password2020!", "iloveyou1234", "x1x1x1x1x1x1x1"):
        with pytest.raises(UserError, match="password too weak"):
            create_user("x1", "clinician", common)
    with pytest.raises(UserError, match="password too weak"):  # the user's own names count as guessable
        create_user("margaret.hamilton", "clinician", "margaret.hamilton", full_name="Margaret Hamilton")
    with pytest.raises(UserError, match="invalid user name"):
        create_user("x 1", "clinician", "long-enough-quartz-1")
    create_user("x1", "clinician", "long-enough-quartz-1")
    with pytest.raises(UserError, match="already exists"):
        create_user("x1", "admin", "long-enough-quartz-1")


def test_lockout_after_repeated_failures_and_unlock(cxr_env):
    from compliance.users import MAX_FAILED_LOGINS, AuthenticationError, authenticate_password, create_user, unlock_user

    create_user("carol", "compliance_officer", "carol-amber-thistle-48")
    for _ in range(MAX_FAILED_LOGINS):
        with pytest.raises(AuthenticationError):
            authenticate_password("carol", "guess-guess-guess")
    with pytest.raises(AuthenticationError, match="wrong user name or password, or the account is locked"):
        authenticate_password("carol", "carol-amber-thistle-48")  # right password, locked account: same message
    assert _events("auth.login_failed")[-1]["details"]["reason"] == "account-locked"
    unlock_user("carol", actor="root")
    assert authenticate_password("carol", "carol-amber-thistle-48").name == "carol"


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

    create_user("dr-a", "clinician", "clinician-sparrow-ridge-73")
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

    create_user("rita", "researcher", "rita-copper-lantern-27")
    assert require_role("rita", ["researcher"], action="train").name == "rita"
    with pytest.raises(PermissionDenied, match="role 'researcher'"):
        require_role("rita", ["approver"], action="model.approve", subject="model/covid-cxr/1")
    with pytest.raises(PermissionDenied, match="unknown user"):
        require_role("ghost", ["admin"], action="user.create")
    denied = _events("auth.permission_denied")
    assert [(e["actor"], e["details"]["action"]) for e in denied] == [("rita", "model.approve"), ("ghost", "user.create")]


def test_sites_are_stored_validated_and_changed(cxr_env):
    from compliance.users import UserError, configured_sites, create_user, set_sites, sites_of

    create_user("dr-s", "clinician", "clinician-sparrow-ridge-73", sites=["site-a", "site-b", "site-a"])
    assert sites_of("dr-s") == ["site-a", "site-b"]
    with pytest.raises(UserError, match="invalid site code"):
        create_user("dr-t", "clinician", "clinician-sparrow-ridge-73", sites=["../etc"])
    assert set_sites("dr-s", ["site-c"], actor="root") == ["site-c"]
    assert sites_of("dr-s") == ["site-c"] and configured_sites() == {"site-c"}
    changed = _events("user.sites_changed")[-1]
    assert changed["details"] == {"user": "dr-s", "from": ["site-a", "site-b"], "to": ["site-c"]}


BOSS_PW, CLIN_PW = "boss-marble-canyon-84", "clinician-sparrow-ridge-73"


def test_cli_users_and_tokens(cxr_env):
    from app.cli.governance import register
    from compliance.users import authenticate_password, sites_of, user_for_token

    app = typer.Typer()
    register(app)
    r = CliRunner()

    def run(args, stdin=None, **env):
        return r.invoke(app, args, input=stdin, env={"CXR_USER": None, "CXR_TOKEN": None, **env})

    def boss(args, stdin=""):  # authenticated as the admin with the password on stdin's first line
        return run([*args, "--as", "boss", "--password-stdin"], f"{BOSS_PW}\n{stdin}")

    # bootstrap: the first user, an admin, without credentials
    res = run(["users", "add", "boss", "--role", "admin", "--full-name", "Bo Boss", "--new-password-stdin"],
              BOSS_PW + "\n")
    assert res.exit_code == 0 and "bootstrap" in res.output, res.output
    res = boss(["users", "add", "dr-b", "--role", "clinician", "--site", "site-a", "--site", "site-b",
                "--new-password-stdin"], CLIN_PW + "\n")
    assert res.exit_code == 0, res.output
    assert sites_of("dr-b") == ["site-a", "site-b"]
    # a claimed name is not enough any more (the old `--as boss` / CXR_USER=boss without a credential)
    for res in (run(["tokens", "issue", "--user", "dr-b", "--as", "boss"]),
                run(["tokens", "issue", "--user", "dr-b"], CXR_USER="boss"),
                run(["users", "disable", "dr-b"], CXR_USER="boss")):
        assert res.exit_code == 1 and "needs an authenticated user" in res.output and "cxr_" not in res.stdout
    # token alone on stdout
    res = boss(["tokens", "issue", "--user", "dr-b"])
    assert res.exit_code == 0, res.output
    token = res.stdout.strip()
    assert res.stdout == token + "\n" and user_for_token(token).name == "dr-b"
    boss_token = boss(["tokens", "issue", "--user", "boss"]).stdout.strip()
    # non-admins may not issue tokens, add or disable users (authenticated by their personal token)
    res = run(["tokens", "issue", "--user", "dr-b"], CXR_TOKEN=token)
    assert res.exit_code == 1 and "permission denied" in res.output and "cxr_" not in res.stdout
    assert run(["users", "disable", "boss"], CXR_TOKEN=token).exit_code == 1
    res = run(["users", "disable", "boss"], CXR_TOKEN="cxr_forged-token")
    assert res.exit_code == 1 and "unknown, revoked or expired" in res.output
    res = run(["users", "disable", "boss", "--as", "boss"], CXR_TOKEN=token)  # --as must match the token
    assert res.exit_code == 1 and "does not match" in res.output
    # sites: admin only
    assert run(["users", "sites", "dr-b", "--site", "site-z"], CXR_TOKEN=token).exit_code == 1
    res = run(["users", "sites", "dr-b", "--site", "site-c"], CXR_TOKEN=boss_token)
    assert res.exit_code == 0 and sites_of("dr-b") == ["site-c"], res.output
    # list shows users and sites, never hashes
    res = run(["users", "list", "--json"])
    assert res.exit_code == 0 and "scrypt" not in res.output and '"dr-b"' in res.output and "site-c" in res.output
    # passwd: yourself with the current password (not with a token), or an admin; the policy applies
    new_pw = "dr-b-walnut-glacier-90"
    res = run(["users", "passwd", "dr-b", "--new-password-stdin"], new_pw + "\n", CXR_TOKEN=token)
    assert res.exit_code == 1 and "current password" in res.output
    res = run(["users", "passwd", "dr-b", "--as", "dr-b", "--password-stdin", "--new-password-stdin"],
              f"{CLIN_PW}\npassword12345\n")
    assert res.exit_code == 1 and "too weak" in res.output
    res = run(["users", "passwd", "dr-b", "--as", "dr-b", "--password-stdin", "--new-password-stdin"],
              f"{CLIN_PW}\n{new_pw}\n")
    assert res.exit_code == 0, res.output
    assert authenticate_password("dr-b", new_pw).name == "dr-b"
    assert run(["users", "passwd", "boss", "--new-password-stdin"], "boss-taken-over-12345\n",
               CXR_TOKEN=token).exit_code == 1  # a clinician cannot reset the admin's password
    res = run(["users", "passwd", "dr-b", "--new-password-stdin"], "dr-b-reset-by-admin-77\n", CXR_TOKEN=boss_token)
    assert res.exit_code == 0, res.output
    res = run(["tokens", "revoke", token], CXR_TOKEN=boss_token)
    assert res.exit_code == 0 and user_for_token(token) is None
    assert boss(["users", "disable", "dr-b"]).exit_code == 0
    res = boss(["users", "disable", "dr-b"])
    assert res.exit_code == 1 and "already disabled" in res.output
    res = boss(["users", "add", "dr-c", "--role", "clinician", "--new-password-stdin"], "")
    assert res.exit_code == 1 and "no (further) line" in res.output
    res = run(["users", "add", "dr-d", "--role", "clinician", "--as", "boss", "--password-stdin"], "")
    assert res.exit_code == 1 and "stdin is empty" in res.output


def test_dev_single_user_mode_is_explicit_loud_and_audited(cxr_env, monkeypatch):
    from app.cli.governance import register
    from compliance.users import create_user

    create_user("solo", "admin", BOSS_PW)
    app = typer.Typer()
    register(app)
    env = {"CXR_USER": "solo", "CXR_TOKEN": None}
    res = CliRunner().invoke(app, ["users", "sites", "solo", "--site", "lab"], env=env)
    assert res.exit_code == 1 and "needs an authenticated user" in res.output  # not the default
    res = CliRunner().invoke(app, ["users", "sites", "solo", "--site", "lab"], env={**env, "CXR_DEV_SINGLE_USER": "1"})
    assert res.exit_code == 0, res.output
    assert "WITHOUT authentication" in res.output
    dev = _events("auth.dev_single_user")
    assert dev and dev[-1]["actor"] == "solo" and dev[-1]["details"] == {"command": "user.sites", "authenticated": False}
