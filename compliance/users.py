"""Users, roles and API tokens (21 CFR Part 11 §11.10(d), §11.10(g), §11.300).

* Passwords are stored as ``scrypt`` hashes (memory-hard, per-user random salt, parameters stored
  with the hash so they can be raised later without breaking old accounts).
* API tokens are random (256 bits), shown once, and stored only as their SHA-256: a stolen copy of
  the database does not yield a usable token. One role per token: the token acts with its user's role.
* Every change (user created/disabled, token issued/revoked) and every failed login is an audit
  event, written here by the code that acts.
* After ``MAX_FAILED_LOGINS`` consecutive failures an account is locked (§11.300(d): attempts at
  unauthorised use are detected and stopped); an admin unlocks it (``unlock_user``).

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
from core.schema import ApiToken, User

ROLES: tuple[str, ...] = ("clinician", "researcher", "approver", "compliance_officer", "admin")

# scrypt cost: n=2**14, r=8, p=1 → 16 MiB and ~50 ms per hash on one core (OWASP minimum class).
SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_DKLEN = 2**14, 8, 1, 32
MIN_PASSWORD_LENGTH = 8
MAX_FAILED_LOGINS = 5
TOKEN_PREFIX = "cxr_"
DEFAULT_TOKEN_DAYS = 365
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


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


def _check_password_policy(password: str) -> None:
    if password is None or len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"password too short: at least {MIN_PASSWORD_LENGTH} characters are required")


# --------------------------------------------------------------------------- users
def create_user(name: str, role: str, password: str, *, full_name: str | None = None,
                actor: str | None = None) -> User:
    """Create an active user. ``full_name`` is the printed name on e-signatures (§11.50)."""
    if not name or not _NAME_RE.match(name):
        raise UserError(f"invalid user name {name!r}: use 1-64 letters, digits, '.', '_', '-', '@'")
    if role not in ROLES:
        raise UserError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
    _check_password_policy(password)
    full_name = (full_name or name).strip()
    actor = actor or name
    with session_scope() as s:
        if s.execute(select(User).where(User.name == name)).scalar_one_or_none() is not None:
            raise UserError(f"user {name!r} already exists (user names are never reused)")
        user = User(name=name, full_name=full_name, role=role, password_hash=hash_password(password), active=True,
                    failed_logins=0, locked=False, created_at=_now(), created_by=actor)
        s.add(user)
    record_event("user.created", actor=actor, role=_role_of(actor), subject=f"user/{name}",
                 details={"user": name, "role": role})
    return user


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
    """Return the active user whose password matches, else raise ``AuthenticationError``.

    Every failure is recorded as ``auth.login_failed`` (no password, only the reason). ``purpose``
    says why credentials were asked for (e.g. ``e-signature``) and goes into that audit entry.
    """
    with session_scope() as s:
        user = s.execute(select(User).where(User.name == name)).scalar_one_or_none()
        if user is None:
            verify_password(password or "", _DUMMY_HASH)
            reason = "unknown-user"
        elif not verify_password(password or "", user.password_hash):
            user.failed_logins = (user.failed_logins or 0) + 1
            reason = "bad-password"
            if user.failed_logins >= MAX_FAILED_LOGINS and not user.locked:
                user.locked = True
                reason = "bad-password-account-locked"
        elif not user.active:
            reason = "account-disabled"
        elif user.locked:
            reason = "account-locked"
        else:
            user.failed_logins = 0
            return user
        role = user.role if user else "unknown"
    record_event("auth.login_failed", actor=name or "", role=role, subject=f"user/{name}",
                 details={"reason": reason, "purpose": purpose})
    # One message for every reason: do not tell an attacker which part was wrong.
    if reason in ("account-disabled", "account-locked", "bad-password-account-locked"):
        raise AuthenticationError(f"authentication failed for {name!r}: account is "
                                  f"{'disabled' if reason == 'account-disabled' else 'locked'}")
    raise AuthenticationError(f"authentication failed for {name!r}: wrong user name or password")


def require_role(name: str | None, roles: Iterable[str], *, action: str, subject: str = "") -> User:
    """The active user ``name`` if they hold one of ``roles``; else audit ``auth.permission_denied``."""
    roles = tuple(roles)
    user = get_user(name) if name else None
    if user is not None and user.active and not user.locked and user.role in roles:
        return user
    why = ("unknown user" if user is None else "account disabled" if not user.active
           else "account locked" if user.locked else f"role {user.role!r}")
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
        if tok.revoked_at or not user.active or user.locked:
            return None
        if tok.expires_at and tok.expires_at <= _now():
            return None
        return user
