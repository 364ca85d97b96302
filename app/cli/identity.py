"""Who is acting on the command line, authenticated.

Every command whose audit entry names a responsible person (train / pipeline run / reproduce —
they register model versions whose ``trained_by``/``registered_by`` tags separation of duties
relies on —, user and token administration, report export; e-signatures re-authenticate on their
own) calls ``authenticated_user`` first. Credentials, in this order:

1. ``CXR_TOKEN``: a personal bearer token (``cxr tokens issue``); the user is its owner. ``--as``,
   when given as well, must name that owner.
2. ``--as USER`` (or ``CXR_USER``) with ``--password-stdin`` (the password is the first line of
   stdin), or a hidden prompt when stdin is a terminal.
3. Only when ``CXR_DEV_SINGLE_USER=1`` is set explicitly: the claimed name of an existing active
   user, without a credential — for a one-person development install. It is never the default,
   prints a warning on every use and writes an ``auth.dev_single_user`` audit entry naming the
   command, so such actions stand out in the trail and in the compliance report.

Without credentials the command refuses with one clear message (exit 1).
"""
from __future__ import annotations

import logging
import os
import sys

import typer

log = logging.getLogger("cxr.cli")
DEV_MODE_ENV = "CXR_DEV_SINGLE_USER"
NEED_CREDENTIALS = ("{what} needs an authenticated user: give --as USER --password-stdin (the password on the "
                    "first line of stdin) or a personal token in CXR_TOKEN (`cxr tokens issue`)")


def claimed_name(as_user: str | None) -> str | None:
    return as_user or os.environ.get("CXR_USER") or None


def authenticated_user(as_user: str | None, password_stdin: bool, *, what: str):
    """The authenticated ``compliance.users.User`` acting, else ``AuthenticationError`` (a
    ``GovernanceError``: callers print its message and exit 1)."""
    from compliance.users import AuthenticationError, authenticate_password, authenticate_token, get_user

    purpose = f"cli:{what}"
    token = os.environ.get("CXR_TOKEN", "").strip()
    if token:
        user = authenticate_token(token, purpose=purpose)
        if as_user and as_user != user.name:
            raise AuthenticationError(f"--as {as_user!r} does not match the owner of CXR_TOKEN")
        return user
    name = claimed_name(as_user)
    if name and (password_stdin or sys.stdin.isatty()):
        if password_stdin:
            line = sys.stdin.readline()
            if not line:
                raise AuthenticationError("--password-stdin given but stdin is empty")
            password = line.rstrip("\r\n")
        else:
            password = typer.prompt(f"Password for {name}", hide_input=True)
        return authenticate_password(name, password, purpose=purpose)
    if os.environ.get(DEV_MODE_ENV) == "1" and name:
        user = get_user(name)
        if user is None or not user.active:
            raise AuthenticationError(f"{DEV_MODE_ENV}=1: {name!r} is not an active user")
        from compliance.audit import record_event

        msg = (f"WARNING: {DEV_MODE_ENV}=1 — '{what}' runs as {name!r} WITHOUT authentication "
               "(development only; recorded in the audit trail)")
        print(msg, file=sys.stderr)
        log.warning(msg)
        record_event("auth.dev_single_user", actor=name, role=user.role, subject=f"cli:{what}",
                     details={"command": what, "authenticated": False})
        return user
    raise AuthenticationError(NEED_CREDENTIALS.format(what=what))
