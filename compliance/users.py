"""Users, roles and API tokens (21 CFR Part 11 §11.10(d), §11.10(g), §11.300).

* Passwords are stored as ``scrypt`` hashes (memory-hard, per-user random salt, parameters stored
  with the hash so they can be raised later without breaking old accounts).
* API tokens are random (256 bits), shown once, and stored only as their SHA-256: a stolen copy of
  the database does not yield a usable token. One role per token: the token acts with its user's role.
* Every change (user created/disabled, token issued/revoked) and every failed login is an audit
  event, written here by the code that acts.
* After ``MAX_FAILED_LOGINS`` consecutive failures an account is locked (§11.300(d): attempts at
  unauthorised use are detected and stopped); an admin unlocks it (``unlock_user``). The lock stops
  *password* use only (CLI sign-in, e-signatures): anyone can type wrong passwords for any name, so
  a lock must not be a way to switch off someone else's bearer tokens. Tokens end by revocation,
  expiry or disabling the user.
* Password check, constant order: the password is always verified (against the user's hash, or a
  dummy hash for an unknown name) *before* the account state is looked at, and every failure —
  wrong password, unknown user, locked, disabled — raises the same message. The audit entry keeps
  the real reason for the compliance officer.
* Password rules (``check_password_policy``): at least ``MIN_PASSWORD_LENGTH`` characters and a
  zxcvbn strength score of at least ``MIN_PASSWORD_SCORE`` (its dictionaries hold the common
  passwords, names and keyboard patterns; the user name and printed name count as guessable).
* Sites (``user_sites``): the sites a user works for. A clinician files, reads and records outcomes
  for predictions of their sites only (enforced by the API); the union of all users' sites is the
  set of configured sites, the only site values a prediction or a metric label may carry.

Authorisation (who may call what) is enforced by the callers (CLI, API) with ``require_role``;
these functions take an ``actor`` only to attribute the audit entry.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import datetime, timedelta, timezone
from typing import Iterable

from sqlalchemy import select

from compliance.audit import record_event
from core.db import session_scope
from core.schema import ApiToken, User, UserSite

ROLES: tuple[str, ...] = ("clinician", "researcher", "approver", "compliance_officer", "admin")

# scrypt cost: n=2**14, r=8, p=1 → 16 MiB and ~50 ms per hash on one core (OWASP minimum class).
SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_DKLEN = 2**14, 8, 1, 32
MIN_PASSWORD_LENGTH = 12
MIN_PASSWORD_SCORE = 3  # zxcvbn 0-4; 3 = "safely unguessable: moderate protection from offline attacks"
MAX_FAILED_LOGINS = 5
TOKEN_PREFIX = "cxr_"
DEFAULT_TOKEN_DAYS = 365
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
SITE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,47}$")  # = app.schemas.SITE_PATTERN
AUTH_FAILED = "authentication failed: wrong user name or password, or the account is locked or disabled"


class GovernanceError(Exception):
    """Base of every refusal in the governance layer (the CLI prints the message, exits non-zero)."""


class UserError(GovernanceError):
    """Bad input or an impossible user/token operation."""


class AuthenticationError(GovernanceError):
    """Wrong credentials, unknown, disabled or locked account."""


class PermissionDenied(GovernanceError):
    """The acting user lacks the role (or is barred by separation of duties)."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")






# --------------------------------------------------------------------------- passwords
def hash_password(password: str, *, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            dklen=SCRYPT_DKLEN, maxmem=64 * 1024 * 1024)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        algo, n, r, p, salt_hex, digest_hex = stored.split("$")
        if algo != "scrypt":
            return False
        digest = hashlib.scrypt(password.encode("utf-8"), salt=bytes.fromhex(salt_hex), n=int(n), r=int(r),
                                p=int(p), dklen=len(digest_hex) // 2, maxmem=64 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest.hex(), digest_hex)


# A fixed dummy hash so that an unknown user costs as much time as a wrong password (no user
# enumeration by timing).
_DUMMY_HASH = hash_password("dummy-password-for-timing", salt=b"\0" * 16)


def check_password_policy(password: str | None, *, user_inputs: Iterable[str] = ()) -> None:
    """At least ``MIN_PASSWORD_LENGTH`` characters and zxcvbn score >= ``MIN_PASSWORD_SCORE``."""
    if password is None or len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"password too short: at least {MIN_PASSWORD_LENGTH} characters are required")
    from zxcvbn import zxcvbn

    result = zxcvbn(password[:200], user_inputs=[u for u in user_inputs if u])
    if int(result["score"]) < MIN_PASSWORD_SCORE:
        hint = (result.get("feedback") or {}).get("warning") or "it is a common or guessable password"
        raise UserError(f"password too weak (strength {result['score']}/4, at least {MIN_PASSWORD_SCORE} required): "
                        f"{hint.rstrip('.')}; use a longer passphrase of unrelated words")



def _clean_sites(sites: Iterable[str] | None) -> list[str]:
    out: list[str] = []
    for site in sites or ():
        site = (site or "").strip()
        if not SITE_RE.match(site):
            raise UserError(f"invalid site code {site!r}: use 1-48 letters, digits, '.', '_', '-'")
        if site not in out:
            out.append(site)
    return out


# --------------------------------------------------------------------------- users
def create_user(name: str, role: str, password: str, *, full_name: str | None = None,
                actor: str | None = None, sites: Iterable[str] | None = None) -> User:
    """Create an active user. ``full_name`` is the printed name on e-signatures (§11.50); ``sites``
    the sites they work for (a clinician needs at least one to file predictions)."""
    if not name or not _NAME_RE.match(name):
        raise UserError(f"invalid user name {name!r}: use 1-64 letters, digits, '.', '_', '-', '@'")
    if role not in ROLES:
        raise UserError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
    site_list = _clean_sites(sites)
    check_password_policy(password, user_inputs=(name, full_name or ""))
    full_name = (full_name or name).strip()
    actor = actor or name
    with session_scope() as s:
        if s.execute(select(User).where(User.name == name)).scalar_one_or_none() is not None:
            raise UserError(f"user {name!r} already exists (user names are never reused)")
        user = User(name=name, full_name=full_name, role=role, password_hash=hash_password(password), active=True,
                    failed_logins=0, locked=False, created_at=_now(), created_by=actor)
        s.add(user)
        s.flush()
        for site in site_list:
            s.add(UserSite(user_id=user.id, site=site))
    record_event("user.created", actor=actor, role=_role_of(actor), subject=f"user/{name}",
                 details={"user": name, "role": role, "sites": site_list})
    return user


def set_password(name: str, password: str, *, actor: str) -> None:
    """Set a new password (policy checked); clears the failed-login count and the lock."""
    with session_scope() as s:
        user = s.execute(select(User).where(User.name == name)).scalar_one_or_none()
        if user is None:
            raise UserError(f"no such user {name!r}")
        check_password_policy(password, user_inputs=(user.name, user.full_name))
        user.password_hash = hash_password(password)
        user.failed_logins, user.locked = 0, False
    record_event("user.password_changed", actor=actor, role=_role_of(actor), subject=f"user/{name}",
                 details={"user": name, "by_self": actor == name})


def sites_of(name: str) -> list[str]:
    with session_scope() as s:
        return list(s.execute(select(UserSite.site).join(User, UserSite.user_id == User.id)
                              .where(User.name == name).order_by(UserSite.site)).scalars().all())


def configured_sites() -> set[str]:
    """Every site some user works for: the only valid site codes (predictions, metric labels)."""
    with session_scope() as s:
        return set(s.execute(select(UserSite.site).distinct()).scalars().all())


def set_sites(name: str, sites: Iterable[str], *, actor: str) -> list[str]:
    """Replace the sites of ``name`` (admin). Returns the new list."""
    site_list = _clean_sites(sites)
    with session_scope() as s:
        user = s.execute(select(User).where(User.name == name)).scalar_one_or_none()
        if user is None:
            raise UserError(f"no such user {name!r}")
        before = sorted(s.execute(select(UserSite.site).where(UserSite.user_id == user.id)).scalars().all())
        for row in s.execute(select(UserSite).where(UserSite.user_id == user.id)).scalars().all():
            s.delete(row)
        s.flush()
        for site in site_list:
            s.add(UserSite(user_id=user.id, site=site))
    record_event("user.sites_changed", actor=actor, role=_role_of(actor), subject=f"user/{name}",
                 details={"user": name, "from": before, "to": sorted(site_list)})
    return sorted(site_list)


def get_user(name: str) -> User | None:
    with session_scope() as s:
        return s.execute(select(User).where(User.name == name)).scalar_one_or_none()


def list_users() -> list[User]:
    with session_scope() as s:
        return list(s.execute(select(User).order_by(User.id)).scalars().all())


def count_users() -> int:
    return len(list_users())


def _role_of(name: str | None) -> str:
    if not name:
        return "unknown"
    user = get_user(name)
    return user.role if user else "unknown"


def disable_user(name: str, *, actor: str | None = None) -> User:
    """Deactivate a user (never delete: audit entries and signatures keep referring to them)."""
    actor = actor or "unknown"
    with session_scope() as s:
        user = s.execute(select(User).where(User.name == name)).scalar_one_or_none()
        if user is None:
            raise UserError(f"no such user {name!r}")
        if not user.active:
            raise UserError(f"user {name!r} is already disabled")
        user.active = False
        user.disabled_at = _now()
        # Disabling a user revokes their tokens.
        now = _now()
        for tok in s.execute(select(ApiToken).where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))).scalars():
            tok.revoked_at, tok.revoked_by = now, actor
    record_event("user.disabled", actor=actor, role=_role_of(actor), subject=f"user/{name}", details={"user": name})
    return user


def unlock_user(name: str, *, actor: str | None = None) -> User:
    actor = actor or "unknown"
    with session_scope() as s:
        user = s.execute(select(User).where(User.name == name)).scalar_one_or_none()
        if user is None:
            raise UserError(f"no such user {name!r}")
        user.locked, user.failed_logins = False, 0
    record_event("user.unlocked", actor=actor, role=_role_of(actor), subject=f"user/{name}", details={"user": name})
    return user


def authenticate_password(name: str, password: str, *, purpose: str = "login") -> User:
    """Return the active, unlocked user whose password matches, else raise ``AuthenticationError``.

    Constant order: the password is verified first (against a dummy hash for an unknown name), then
    the account state; every failure raises the same message (``AUTH_FAILED``), so neither the
    message nor the time tells an unknown name, a wrong password and a locked or disabled account
    apart. Every failure is recorded as ``auth.login_failed`` with the real reason (never the
    password); ``purpose`` says why credentials were asked for (e.g. ``e-signature``).
    """
    with session_scope() as s:
        user = s.execute(select(User).where(User.name == name)).scalar_one_or_none()
        ok = verify_password(password or "", user.password_hash if user is not None else _DUMMY_HASH)
        if user is None:
            reason = "unknown-user"
        elif not user.active:
            reason = "account-disabled"
        elif user.locked:
            reason = "account-locked"  # even with the right password: no oracle for a locked account
        elif not ok:
            user.failed_logins = (user.failed_logins or 0) + 1
            reason = "bad-password"
            if user.failed_logins >= MAX_FAILED_LOGINS:
                user.locked = True
                reason = "bad-password-account-locked"
        else:
            user.failed_logins = 0
            return user
        role = user.role if user else "unknown"
    record_event("auth.login_failed", actor=name or "", role=role, subject=f"user/{name}",
                 details={"reason": reason, "purpose": purpose})
    raise AuthenticationError(AUTH_FAILED)


def authenticate_token(token: str | None, *, purpose: str = "cli") -> User:
    """The active user a personal bearer token belongs to, else ``AuthenticationError`` (audited)."""
    user = user_for_token(token)
    if user is None:
        record_event("auth.login_failed", actor="anonymous", role="unknown", subject="token",
                     details={"reason": "invalid-token", "purpose": purpose})
        raise AuthenticationError("authentication failed: the token (CXR_TOKEN) is unknown, revoked or expired")
    return user


def require_role(name: str | None, roles: Iterable[str], *, action: str, subject: str = "") -> User:
    """The active user ``name`` if they hold one of ``roles``; else audit ``auth.permission_denied``."""
    roles = tuple(roles)
    user = get_user(name) if name else None
    if user is not None and user.active and user.role in roles:
        return user
    why = "unknown user" if user is None else "account disabled" if not user.active else f"role {user.role!r}"
    record_event("auth.permission_denied", actor=name or "", role=user.role if user else "unknown", subject=subject,
                 details={"action": action, "required_roles": list(roles), "reason": why})
    raise PermissionDenied(f"permission denied: {action} needs role {' or '.join(roles)}; "
                           f"acting user {name!r} has {why}")


# --------------------------------------------------------------------------- tokens
def _token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def issue_token(name: str, *, actor: str | None = None, expires_days: int | None = DEFAULT_TOKEN_DAYS) -> str:
    """A new bearer token for ``name`` (returned once; only its SHA-256 is stored)."""
    actor = actor or name
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    digest = _token_sha256(token)
    with session_scope() as s:
        user = s.execute(select(User).where(User.name == name)).scalar_one_or_none()
        if user is None:
            raise UserError(f"no such user {name!r}")
        if not user.active:
            raise UserError(f"user {name!r} is disabled: no token issued")
        expires = None
        if expires_days:
            expires = (datetime.now(timezone.utc) + timedelta(days=expires_days)).isoformat(
                timespec="seconds").replace("+00:00", "Z")
        tok = ApiToken(token_id=digest[:12], token_sha256=digest, user_id=user.id, issued_at=_now(),
                       issued_by=actor, expires_at=expires)
        s.add(tok)
        role = user.role
    record_event("token.issued", actor=actor, role=_role_of(actor), subject=f"user/{name}",
                 details={"user": name, "token_id": digest[:12], "token_role": role, "expires_at": expires})
    return token


def revoke_token(token_or_id: str, *, actor: str | None = None) -> str:
    """Revoke a token given the token itself or its 12-character id; returns the token id."""
    actor = actor or "unknown"
    key = token_or_id.strip()
    with session_scope() as s:
        if key.startswith(TOKEN_PREFIX):
            tok = s.execute(select(ApiToken).where(ApiToken.token_sha256 == _token_sha256(key))).scalar_one_or_none()
        else:
            tok = s.execute(select(ApiToken).where(ApiToken.token_id == key)).scalar_one_or_none()
        if tok is None:
            raise UserError("no such token (give the token itself or its 12-character id)")
        if tok.revoked_at:
            raise UserError(f"token {tok.token_id} is already revoked")
        tok.revoked_at, tok.revoked_by = _now(), actor
        token_id = tok.token_id
        owner = s.get(User, tok.user_id)
        owner_name = owner.name if owner else ""
    record_event("token.revoked", actor=actor, role=_role_of(actor), subject=f"user/{owner_name}",
                 details={"user": owner_name, "token_id": token_id})
    return token_id


def list_tokens(name: str | None = None) -> list[dict]:
    with session_scope() as s:
        q = select(ApiToken, User).join(User, ApiToken.user_id == User.id).order_by(ApiToken.id)
        if name:
            q = q.where(User.name == name)
        return [{"token_id": t.token_id, "user": u.name, "role": u.role, "issued_at": t.issued_at,
                 "issued_by": t.issued_by, "expires_at": t.expires_at, "revoked_at": t.revoked_at}
                for t, u in s.execute(q).all()]


def user_for_token(token: str | None) -> User | None:
    """The active user a bearer token belongs to, or None (unknown, revoked, expired, user disabled)."""
    if not token:
        return None
    digest = _token_sha256(token.strip())
    with session_scope() as s:
        row = s.execute(select(ApiToken, User).join(User, ApiToken.user_id == User.id)
                        .where(ApiToken.token_sha256 == digest)).first()
        if row is None:
            return None
        tok, user = row
        if tok.revoked_at or not user.active:  # a password lock does not stop tokens (see module doc)
            return None
        if tok.expires_at and tok.expires_at <= _now():
            return None
        return user
