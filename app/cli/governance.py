"""``cxr users``, ``cxr tokens``, ``cxr model``, ``cxr audit``: governance from the command line.

Identity: every command whose audit entry names a responsible person authenticates that person
(``app.cli.identity.authenticated_user``): a personal token in ``CXR_TOKEN``, or ``--as USER`` with
``--password-stdin`` (first stdin line; a hidden prompt on a terminal). ``--as`` alone is a claim
and is refused. ``CXR_DEV_SINGLE_USER=1`` is the explicit, audited development escape hatch.

Who may do what on the CLI
--------------------------
* Bootstrap: while the user table is empty, whoever can write CXR_HOME may create the FIRST user,
  without credentials, and it must have the ``admin`` role (``cxr users add NAME --role admin
  --new-password-stdin``). It is audited (``user.created`` with ``bootstrap: true``). Do it at
  installation time: until then, anyone with access to CXR_HOME could.
* Afterwards ``users add/disable/unlock/sites`` and ``tokens issue/revoke`` need an authenticated
  active ``admin``; ``users passwd NAME`` needs NAME themself (with their current password) or an
  admin. New passwords: ``--new-password-stdin`` reads the next stdin line (after the acting user's
  password when ``--password-stdin`` is given too), else a hidden prompt with confirmation.
* Signing (``model approve/reject/rollback/retire``) always re-authenticates the signer with their
  password (§11.200): ``--password-stdin`` reads one line from stdin, otherwise a hidden prompt. The
  signer is ``--as`` (or ``CXR_USER``, or the owner of ``CXR_TOKEN``); a token alone never signs.
* ``audit export`` needs an authenticated ``compliance_officer`` or ``admin``; ``audit verify``,
  ``model check/list/show/card``, ``users list``, ``tokens list`` are read-only.

Every refusal prints one clear message on stderr and exits non-zero (1); never a traceback.
"""
from __future__ import annotations

import functools
import json
import sys
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table


class _LazyConsole:
    """A Rich console bound at print time (so test runners' stream swaps work), wide when piped so
    tables and hashes are not wrapped for machines reading the output."""

    def __init__(self, stderr: bool = False) -> None:
        self.stderr = stderr

    def print(self, *args: Any, **kwargs: Any) -> None:
        stream = sys.stderr if self.stderr else sys.stdout
        width = None if stream.isatty() else 200
        Console(file=stream, width=width, stderr=self.stderr).print(*args, **kwargs)


out = _LazyConsole()
err = _LazyConsole(stderr=True)

users_app = typer.Typer(help="Users and roles (admin).", no_args_is_help=True)
tokens_app = typer.Typer(help="API bearer tokens (admin).", no_args_is_help=True)
model_app = typer.Typer(help="Model governance: release policy, signed approvals, roll-back.", no_args_is_help=True)
audit_app = typer.Typer(help="Audit trail: verify the hash chain, export compliance reports.", no_args_is_help=True)

AsUser = Annotated[Optional[str], typer.Option("--as", help="acting user (default CXR_USER); authenticated with "
                                                           "--password-stdin, or use CXR_TOKEN instead")]
PasswordStdin = Annotated[bool, typer.Option("--password-stdin",
                                             help="read the acting user's password from the first line of stdin")]
NewPasswordStdin = Annotated[bool, typer.Option("--new-password-stdin",
                                                help="read the new password from the next line of stdin")]
Sites = Annotated[Optional[list[str]], typer.Option("--site", help="a site the user works for (repeatable)")]
JsonOut = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def guarded(fn: Callable) -> Callable:
    """Turn every expected failure into a message + non-zero exit (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from compliance.policy import PolicyError
        from compliance.registry_access import RegistryError
        from compliance.users import GovernanceError

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except (GovernanceError, RegistryError, PolicyError) as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Exception as exc:  # unexpected: still no traceback for the operator
            _fail(f"{type(exc).__name__}: {exc}")

    return wrapper


def _read_password(from_stdin: bool, prompt: str = "Password", confirm: bool = False) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            _fail("--password-stdin given but stdin is empty")
        return line.rstrip("\r\n")
    if not sys.stdin.isatty():
        _fail("no terminal to prompt for a password: use --password-stdin")
    return typer.prompt(prompt, hide_input=True, confirmation_prompt=confirm)


def _actor(explicit: str | None) -> str:
    """A *claimed* acting user, for read-only commands (never for a governed action)."""
    from core.identity import acting_user

    return acting_user(explicit)


def _authenticated(as_user: str | None, password_stdin: bool, what: str):
    from app.cli.identity import authenticated_user

    return authenticated_user(as_user, password_stdin, what=what)


def _admin(as_user: str | None, password_stdin: bool, action: str, subject: str = "") -> str:
    """Authenticate the acting user and require the admin role; returns the user name."""
    from compliance.users import require_role

    user = _authenticated(as_user, password_stdin, action)
    require_role(user.name, ("admin",), action=action, subject=subject)
    return user.name


def _signer(as_user: str | None) -> str:
    """Who signs: --as, else CXR_USER, else the owner of CXR_TOKEN (the password is asked regardless)."""
    import os

    from app.cli.identity import claimed_name

    name = claimed_name(as_user)
    if not name and os.environ.get("CXR_TOKEN"):
        from compliance.users import authenticate_token

        name = authenticate_token(os.environ["CXR_TOKEN"], purpose="e-signature").name
    if not name:
        _fail("who signs? give --as USER (or CXR_USER, or CXR_TOKEN) and the password (--password-stdin)")
    return name


def _new_password(from_stdin: bool, name: str) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            _fail("--new-password-stdin given but stdin has no (further) line")
        return line.rstrip("\r\n")
    if not sys.stdin.isatty():
        _fail("no terminal to prompt for the new password: use --new-password-stdin")
    return typer.prompt(f"New password for {name}", hide_input=True, confirmation_prompt=True)


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


# --------------------------------------------------------------------------- users
@users_app.command("add")
@guarded
def users_add(name: str, role: Annotated[str, typer.Option("--role", help="clinician|researcher|approver|compliance_officer|admin")],
              full_name: Annotated[Optional[str], typer.Option("--full-name", help="printed name on e-signatures")] = None,
              site: Sites = None, new_password_stdin: NewPasswordStdin = False,
              password_stdin: PasswordStdin = False, as_user: AsUser = None) -> None:
    """Create a user (admin). The first user of an installation must be an admin (bootstrap, no credentials)."""
    from compliance.users import ROLES, count_users, create_user

    if role not in ROLES:
        _fail(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
    if count_users() == 0:
        if role != "admin":
            _fail("no users exist yet: the first user must have role admin (bootstrap rule)")
        # bootstrap: no acting user exists; either flag reads the new admin's password
        password = _new_password(new_password_stdin or password_stdin, name)
        user = create_user(name, role, password, full_name=full_name, actor=name, sites=site)
        out.print(f"created the first user [bold]{user.name}[/] (admin, bootstrap)", highlight=False)
        return
    actor = _admin(as_user, password_stdin, "user.create", f"user/{name}")
    password = _new_password(new_password_stdin, name)
    user = create_user(name, role, password, full_name=full_name, actor=actor, sites=site)
    out.print(f"created user [bold]{user.name}[/] ({user.role}, printed name {user.full_name!r}"
              + (f", sites {', '.join(site)}" if site else "") + ")", highlight=False)


@users_app.command("sites")
@guarded
def users_sites(name: str, site: Sites = None, password_stdin: PasswordStdin = False, as_user: AsUser = None) -> None:
    """Set the sites a user works for (admin): replaces the list; no --site clears it."""
    from compliance.users import set_sites

    actor = _admin(as_user, password_stdin, "user.sites", f"user/{name}")
    now = set_sites(name, site or [], actor=actor)
    out.print(f"sites of {name}: {', '.join(now) or '(none)'}", highlight=False)


@users_app.command("passwd")
@guarded
def users_passwd(name: str, new_password_stdin: NewPasswordStdin = False, password_stdin: PasswordStdin = False,
                 as_user: AsUser = None) -> None:
    """Change a password: the user themself (authenticated with the current password) or an admin."""
    import os

    from compliance.users import require_role, set_password

    user = _authenticated(as_user, password_stdin, "user.passwd")
    if user.name == name:
        if os.environ.get("CXR_TOKEN") and not password_stdin:
            _fail("changing your own password needs your current password (--as NAME --password-stdin), not a token")
    else:
        require_role(user.name, ("admin",), action="user.passwd", subject=f"user/{name}")
    set_password(name, _new_password(new_password_stdin, name), actor=user.name)
    out.print(f"password of {name} changed", highlight=False)


@users_app.command("list")
@guarded
def users_list(json_out: JsonOut = False) -> None:
    """List users (never shows credentials)."""
    from compliance.users import list_users, sites_of

    rows = [u.as_dict() | {"sites": sites_of(u.name)} for u in list_users()]
    if json_out:
        return _print_json(rows)
    t = Table("name", "full name", "role", "sites", "active", "locked", "created", "created by")
    for r in rows:
        t.add_row(r["name"], r["full_name"], r["role"], ",".join(r["sites"]) or "-", str(r["active"]), str(r["locked"]),
                  r["created_at"], r["created_by"])
    out.print(t)


@users_app.command("disable")
@guarded
def users_disable(name: str, as_user: AsUser = None, password_stdin: PasswordStdin = False) -> None:
    """Disable a user (and revoke their tokens). Users are never deleted."""
    from compliance.users import disable_user

    actor = _admin(as_user, password_stdin, "user.disable", f"user/{name}")
    disable_user(name, actor=actor)
    out.print(f"disabled user {name}")


@users_app.command("unlock")
@guarded
def users_unlock(name: str, as_user: AsUser = None, password_stdin: PasswordStdin = False) -> None:
    """Unlock an account locked after repeated failed password logins."""
    from compliance.users import unlock_user

    actor = _admin(as_user, password_stdin, "user.unlock", f"user/{name}")
    unlock_user(name, actor=actor)
    out.print(f"unlocked user {name}")


# --------------------------------------------------------------------------- tokens
@tokens_app.command("issue")
@guarded
def tokens_issue(user: Annotated[str, typer.Option("--user", help="the token's owner")],
                 days: Annotated[int, typer.Option("--days", help="validity in days (0: no expiry)")] = 365,
                 as_user: AsUser = None, password_stdin: PasswordStdin = False) -> None:
    """Issue a bearer token; prints the token alone on stdout (shown once, stored hashed)."""
    from compliance.users import issue_token

    actor = _admin(as_user, password_stdin, "token.issue", f"user/{user}")
    typer.echo(issue_token(user, actor=actor, expires_days=days or None))


@tokens_app.command("revoke")
@guarded
def tokens_revoke(token: Annotated[str, typer.Argument(help="the token, or its 12-character id")],
                  as_user: AsUser = None, password_stdin: PasswordStdin = False) -> None:
    """Revoke a token."""
    from compliance.users import revoke_token

    actor = _admin(as_user, password_stdin, "token.revoke")
    out.print(f"revoked token {revoke_token(token, actor=actor)}")


@tokens_app.command("list")
@guarded
def tokens_list(user: Annotated[Optional[str], typer.Option("--user")] = None, json_out: JsonOut = False) -> None:
    """List tokens by id (the secret itself is never stored)."""
    from compliance.users import list_tokens

    rows = list_tokens(user)
    if json_out:
        return _print_json(rows)
    t = Table("id", "user", "role", "issued", "by", "expires", "revoked")
    for r in rows:
        t.add_row(r["token_id"], r["user"], r["role"], r["issued_at"], r["issued_by"], r["expires_at"] or "-",
                  r["revoked_at"] or "-")
    out.print(t)


# --------------------------------------------------------------------------- model
def _policy_table(result) -> Table:
    t = Table("criterion", "measured", "op", "threshold", "result", "note",
              title=f"release policy {result.policy_version} — {result.model} v{result.version}")
    for c in result.criteria:
        t.add_row(c.id, "-" if c.measured is None else str(c.measured), c.op, "-" if c.threshold is None else str(c.threshold),
                  "[green]PASS[/]" if c.passed else "[red]FAIL[/]", c.note)
    return t


@model_app.command("check")
@guarded
def model_check(version: str, as_user: AsUser = None, json_out: JsonOut = False) -> None:
    """Check a version against the release policy (exit 0 only when every criterion passes)."""
    from compliance.policy import check_release_policy

    result = check_release_policy(version, actor=_actor(as_user))
    if json_out:
        _print_json(result.as_dict())
    else:
        out.print(_policy_table(result))
        if result.error:
            err.print(f"[red]{result.error}[/]")
        out.print(f"overall: {'[green]PASS[/]' if result.passed else '[red]FAIL[/]'}  "
                  f"(evaluation sha256 {result.evaluation_sha256})", highlight=False)
    if not result.passed:
        raise typer.Exit(1)


@model_app.command("approve")
@guarded
def model_approve(version: str, reason: Annotated[str, typer.Option("--reason", help="why it is approved (signed)")],
                  as_user: AsUser = None, password_stdin: PasswordStdin = False,
                  override_policy: Annotated[Optional[str], typer.Option(
                      "--override-policy", help="approve despite a failing policy; REASON is recorded")] = None) -> None:
    """Sign the approval of a candidate (approver; password asked again) and make it the champion."""
    from compliance.approvals import approve_model_version

    signer = _signer(as_user)
    password = _read_password(password_stdin, f"Password for {signer} (e-signature)")
    res = approve_model_version(version, approver=signer, password=password, reason=reason,
                                override_policy_reason=override_policy)
    sig = res["signature"]
    out.print(f"version {res['version']} {sig['meaning']} — signed by {sig['signer_full_name']} ({sig['signer_name']}) "
              f"at {sig['time_utc']}; champion {res['previous_champion'] or '(none)'} → {res['version']}"
              + ("  [yellow]POLICY OVERRIDE recorded[/]" if res["override"] else ""), highlight=False)


@model_app.command("reject")
@guarded
def model_reject(version: str, reason: Annotated[str, typer.Option("--reason")], as_user: AsUser = None,
                 password_stdin: PasswordStdin = False) -> None:
    """Sign the rejection of a candidate version."""
    from compliance.approvals import reject_model_version

    signer = _signer(as_user)
    password = _read_password(password_stdin, f"Password for {signer} (e-signature)")
    res = reject_model_version(version, approver=signer, password=password, reason=reason)
    out.print(f"version {res['version']} rejected — signed by {res['signature']['signer_full_name']}", highlight=False)


@model_app.command("rollback")
@guarded
def model_rollback(reason: Annotated[str, typer.Option("--reason")], as_user: AsUser = None,
                   password_stdin: PasswordStdin = False) -> None:
    """Signed roll-back: champion back to the previously approved version (current one retired)."""
    from compliance.approvals import rollback_champion

    signer = _signer(as_user)
    password = _read_password(password_stdin, f"Password for {signer} (e-signature)")
    res = rollback_champion(approver=signer, password=password, reason=reason)
    out.print(f"champion rolled back {res['from_version']} → {res['to_version']} — signed by "
              f"{res['signature']['signer_full_name']}", highlight=False)


@model_app.command("retire")
@guarded
def model_retire(version: str, reason: Annotated[str, typer.Option("--reason")] = "retired from service",
                 as_user: AsUser = None, password_stdin: PasswordStdin = False) -> None:
    """Sign the retirement of a version that is not the champion."""
    from compliance.approvals import retire_model_version

    signer = _signer(as_user)
    password = _read_password(password_stdin, f"Password for {signer} (e-signature)")
    res = retire_model_version(version, approver=signer, password=password, reason=reason)
    out.print(f"version {res['version']} retired — signed by {res['signature']['signer_full_name']}", highlight=False)


@model_app.command("list")
@guarded
def model_list(json_out: JsonOut = False) -> None:
    """Versions with status, aliases and lineage."""
    from compliance.approvals import list_model_versions

    rows = list_model_versions()
    if json_out:
        return _print_json(rows)
    t = Table("version", "status", "aliases", "dataset", "git commit", "trained by", "approved by", "created")
    for r in rows:
        t.add_row(r["version"], r["status"], ",".join(r["aliases"]), str(r["dataset_version"]), str(r["git_commit"]),
                  str(r["trained_by"]), str(r["approved_by"] or "-"), r["created_utc"])
    out.print(t)


@model_app.command("show")
@guarded
def model_show(version: str, json_out: JsonOut = False) -> None:
    """One version: status, lineage, evaluation, policy, signatures, alias history."""
    from compliance.approvals import show_model_version

    info = show_model_version(version)
    if json_out:
        return _print_json(info)
    out.print(f"[bold]{info['version']}[/]  status {info['status']}  aliases {','.join(info['aliases']) or '-'}", highlight=False)
    for k in ("dataset_version", "git_commit", "trained_by", "registered_by", "run_id", "evaluation_sha256"):
        out.print(f"  {k}: {info.get(k)}", highlight=False)
    if info.get("parameters"):
        out.print("  parameters: " + ", ".join(f"{k}={v}" for k, v in sorted(info["parameters"].items())), highlight=False)
    pol = info["policy"]
    out.print(f"  release policy {pol.get('policy_version', '?')}: {'PASS' if pol.get('passed') else 'FAIL'}"
              + (f" (failed: {', '.join(pol.get('failed_criteria', []))})" if not pol.get("passed") else ""), highlight=False)
    for s in info["signatures"]:
        out.print(f"  signature: {s['signer_full_name']} ({s['signer_name']}) {s['time_utc']} — {s['meaning']} — "
                  f"reason: {s['reason']}" + (f" — POLICY OVERRIDE: {s['policy_override_reason']}" if s["policy_override_reason"] else ""),
                  highlight=False)
    for h in info["alias_history"]:
        out.print(f"  alias {h['alias']}: {h['from_version']} → {h['to_version']} at {h['time_utc']} by {h['actor']}",
                  highlight=False)


@model_app.command("card")
@guarded
def model_card(version: str, out_path: Annotated[Path, typer.Option("--out", help="FILE.md or FILE.pdf")],
               fmt: Annotated[Optional[str], typer.Option("--format", help="md|pdf (default: from --out suffix)")] = None) -> None:
    """Write the model card of a version (Markdown or PDF)."""
    from compliance.model_card import write_model_card

    path = write_model_card(version, out_path, fmt=fmt)
    out.print(f"model card written: {path}", highlight=False)


# --------------------------------------------------------------------------- audit
@audit_app.command("verify")
@guarded
def audit_verify(json_out: JsonOut = False) -> None:
    """Recompute the keyed hash chain, check it against the checkpoints kept outside the database,
    recompute the prediction/outcome row hashes and cross-check e-signatures; exit 0 when all verify,
    else 1 naming the first bad entry, the checkpoint it disagrees with, or the altered/missing signature."""
    from compliance.verification import verify_all

    v = verify_all()
    if json_out:
        _print_json(v)
    else:
        if v["chain_ok"]:
            out.print(f"audit chain intact: {v['n_entries']} entries, head {v['head_hash']} ({v['mode']} mode)",
                      highlight=False)
            cp = v.get("checkpoint")
            if cp:
                out.print(f"checkpoint: agrees with {cp['file']}:{cp['line']} (entry {cp['seq']}, {cp['time_utc']})",
                          highlight=False)
            rows = v.get("rows") or {}
            out.print(f"rows: {rows.get('predictions_verified', 0)} predictions and {rows.get('outcomes_verified', 0)} "
                      f"outcomes match their audit entries", highlight=False)
        else:
            title = "AUDIT CHAIN UNVERIFIABLE" if v["status"] == "unverifiable" else "AUDIT CHAIN BROKEN"
            where = f" at entry {v['first_bad_seq']}" if v["first_bad_seq"] is not None else ""
            err.print(f"[bold red]{title}[/]{where}: {v['message']}", highlight=False)
            for p in v["problems"][1:]:
                err.print(f"  also: {p}", highlight=False)
        for p in v["signature_problems"]:
            err.print(f"[bold red]E-SIGNATURE INVALID[/] {p['signature_id']} (audit entry {p['audit_seq']}): "
                      f"{p['problem']}", highlight=False)
        if v["ok"]:
            out.print("e-signatures: all verify against the audit trail", highlight=False)
    if not v["ok"]:
        raise typer.Exit(1)


@audit_app.command("checkpoint")
@guarded
def audit_checkpoint(as_user: AsUser = None, password_stdin: PasswordStdin = False) -> None:
    """Append a checkpoint of the current head (seq, hash) to the checkpoint file outside the database
    (compliance_officer or admin). Governance actions and the API write them on their own; use this
    after an upgrade, once `cxr audit verify` found the trail intact."""
    from compliance.audit import checkpoint
    from compliance.audit_anchor import checkpoint_path
    from compliance.users import require_role

    actor = _authenticated(as_user, password_stdin, "audit.checkpoint").name
    require_role(actor, ("compliance_officer", "admin"), action="audit.checkpoint")
    cp = checkpoint(f"manual:{actor}")
    if cp is None:
        out.print("the audit trail is empty: nothing to checkpoint", highlight=False)
        return
    out.print(f"checkpoint written to {checkpoint_path()}: entry {cp['seq']}, head {cp['head_hash']}", highlight=False)


@audit_app.command("rotate-key")
@guarded
def audit_rotate_key(as_user: AsUser = None, password_stdin: PasswordStdin = False) -> None:
    """Create a new audit HMAC key (admin); new entries use it, older entries keep verifying with the old
    key (each entry names its key id). Escrow the key folder: a lost key makes its entries unverifiable."""
    from compliance.audit import record_event
    from compliance.audit_anchor import AuditKeyError, rotate_key
    from compliance.users import require_role

    actor = _authenticated(as_user, password_stdin, "audit.rotate_key").name
    user = require_role(actor, ("admin",), action="audit.rotate_key")
    try:
        kid = rotate_key()
    except AuditKeyError as exc:
        _fail(str(exc))
    record_event("audit.key_rotated", actor=actor, role=user.role, subject="audit_trail", details={"key_id": kid})
    out.print(f"new audit key {kid} is now active", highlight=False)


def _parse_day(text: str, *, end: bool) -> str:
    """DATE (YYYY-MM-DD; --to is inclusive) or an ISO date-time → ISO UTC string for comparison."""
    try:
        if len(text) == 10:
            d = date.fromisoformat(text)
            if end:
                d = d + timedelta(days=1)
            return datetime(d.year, d.month, d.day, tzinfo=timezone.utc).isoformat().replace("+00:00", "Z")
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return dt.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    except ValueError:
        _fail(f"invalid date {text!r}: expected YYYY-MM-DD or an ISO date-time")
        raise  # unreachable


@audit_app.command("export")
@guarded
def audit_export(from_: Annotated[str, typer.Option("--from", help="first day (YYYY-MM-DD)")],
                 to: Annotated[str, typer.Option("--to", help="last day, inclusive (YYYY-MM-DD)")],
                 fmt: Annotated[str, typer.Option("--format", help="pdf|csv|json")],
                 out_path: Annotated[Path, typer.Option("--out", help="output file")],
                 as_user: AsUser = None, password_stdin: PasswordStdin = False) -> None:
    """Compliance report for a period (compliance_officer or admin); the export is itself audited."""
    from compliance.reports import export_report
    from compliance.users import require_role

    if fmt not in ("pdf", "csv", "json"):
        _fail(f"unknown format {fmt!r}: expected pdf, csv or json")
    start, end = _parse_day(from_, end=False), _parse_day(to, end=True)
    if start >= end:
        _fail("--from must be before --to")
    actor = _authenticated(as_user, password_stdin, "report.export").name
    require_role(actor, ("compliance_officer", "admin"), action="report.export")
    path = export_report(start, end, fmt, out_path, actor=actor)
    out.print(f"report written: {path}", highlight=False)


def register(root: typer.Typer) -> None:
    root.add_typer(users_app, name="users")
    root.add_typer(tokens_app, name="tokens")
    root.add_typer(model_app, name="model")
    root.add_typer(audit_app, name="audit")
