"""What anchors the audit trail outside the database: the HMAC keys and the checkpoints.

Keys
----
The chain is keyed (HMAC-SHA-256) by default. Every writer — the API, the CLI, training and the
pipeline steps — takes its key from this one module, so no writer breaks the chain:

* ``CXR_AUDIT_HMAC_KEY`` when set (a secret store / the process environment), else
* the newest key file in ``settings.audit_keys_path`` (default ``CXR_HOME/secrets/audit-keys``).
  When that folder holds no key the first writer creates one atomically: the key is written to a
  private temporary file (``os.open(O_CREAT | O_EXCL, 0o600)``) and then hard-linked to its final
  name, so a concurrent writer either sees the whole key or creates its own link attempt that fails
  and reads the winner's key. The folder is made ``0700``.

Each key has an id (``key_id_for(key)``: a fingerprint, never the key) stored in every audit entry
and every checkpoint. Rotation (``rotate_key``, ``cxr audit rotate-key``) adds a new key file whose
name sorts last; old keys stay so older entries still verify. A verifier that lacks a key an entry
names reports ``AuditKeyMissing`` naming the key id and where it looked — a clear error, not a
"broken chain".

``CXR_AUDIT_MODE=plain`` turns keys off (plain SHA-256 entries): a development opt-out only.

Checkpoints
-----------
``(seq, head_hash)`` of the trail, appended as one JSON line each to
``settings.audit_checkpoints_path / checkpoints.jsonl`` (mode 0600, under an exclusive ``flock``)
with a MAC over the line (HMAC with the active key; SHA-256 in plain mode). ``compliance.audit``
writes one after every governance entry, the API one periodically, ``cxr audit checkpoint`` on
demand. ``verify_chain`` checks the chain against them: deleting the newest entries, or rewriting the
trail up to a checkpoint, no longer goes unnoticed. Keep the folder outside the database host's
reach (another volume, append-only storage, or copy it off-host) for the strongest guarantee.
"""
from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from core.config import get_settings

KEY_SUFFIX = ".key"
CHECKPOINT_FILE = "checkpoints.jsonl"
MODES = ("keyed", "plain")

_cache_lock = threading.Lock()
_dir_cache: dict[str, tuple[int, list[tuple[str, bytes]]]] = {}


class AuditKeyError(RuntimeError):
    """The audit key source is misconfigured (unknown mode, unreadable or insecure key file)."""


class AuditKeyMissing(AuditKeyError):
    """An entry or checkpoint names a key this process does not have."""

    def __init__(self, key_id: str, where: str) -> None:
        self.key_id = key_id
        super().__init__(f"audit key {key_id} is not available (looked in {where}); restore it from escrow "
                         f"to verify the entries it signed")


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


# ------------------------------------------------------------------------------------------- keys
def audit_mode() -> str:
    mode = (get_settings().audit_mode or "keyed").strip().lower()
    if mode not in MODES:
        raise AuditKeyError(f"CXR_AUDIT_MODE must be one of {MODES}, got {mode!r}")
    return mode


def key_id_for(key: bytes) -> str:
    """A public fingerprint of a key (stored with each entry); reveals nothing usable about the key."""
    return "k-" + hashlib.sha256(b"cxr-audit-key-id\0" + key).hexdigest()[:20]


def _key_dir() -> Path:
    return get_settings().audit_keys_path


def _where() -> str:
    return f"CXR_AUDIT_HMAC_KEY and {_key_dir()}"


def _read_dir(path: Path) -> list[tuple[str, bytes]]:
    """(file name, key) of every key file, sorted by name (the newest name last)."""
    try:
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        return []
    with _cache_lock:
        hit = _dir_cache.get(str(path))
        if hit and hit[0] == mtime:
            return hit[1]
    keys = []
    for f in sorted(path.glob(f"*{KEY_SUFFIX}")):
        if not f.is_file() or f.is_symlink():
            continue
        mode = f.stat().st_mode & 0o777
        if mode & 0o077:
            raise AuditKeyError(f"audit key file {f} is readable by others (mode {mode:o}); chmod 600 it")
        text = f.read_text().strip()
        if len(text) < 32:
            raise AuditKeyError(f"audit key file {f} is empty or too short")
        keys.append((f.name, text.encode()))
    with _cache_lock:
        _dir_cache[str(path)] = (mtime, keys)
    return keys


def _create_key(path: Path) -> tuple[str, bytes]:
    """A new key file in ``path``, created atomically with mode 0600 (never overwrites)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    value = secrets.token_hex(32)
    key = value.encode()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    final = path / f"{stamp}-{key_id_for(key)}{KEY_SUFFIX}"
    tmp = path / f".tmp-{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (value + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, final)  # atomic; fails if the name exists
    finally:
        os.unlink(tmp)
    return final.name, key


def active_key() -> tuple[str, bytes] | None:
    """(key id, key) every writer signs with now; None in plain mode. Creates the first key if none."""
    if audit_mode() == "plain":
        return None
    env_key = get_settings().audit_hmac_key
    if env_key:
        key = env_key.encode()
        return key_id_for(key), key
    path = _key_dir()
    keys = _read_dir(path)
    if not keys:
        lock_path = path.parent / ".audit-keys.lock"
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # one creator across processes
            keys = _read_dir(path)
            if not keys:
                _create_key(path)
                keys = _read_dir(path)
        finally:
            os.close(fd)
    name, key = keys[-1]
    return key_id_for(key), key


def all_keys() -> dict[str, bytes]:
    out = {key_id_for(k): k for _, k in _read_dir(_key_dir())}
    env_key = get_settings().audit_hmac_key
    if env_key:
        out[key_id_for(env_key.encode())] = env_key.encode()
    return out


def key_by_id(key_id: str) -> bytes:
    key = all_keys().get(key_id)
    if key is None:
        raise AuditKeyMissing(key_id, _where())
    return key


def rotate_key() -> str:
    """Create a new key (it becomes the active one); returns its id. Old keys stay for verification."""
    if get_settings().audit_hmac_key:
        raise AuditKeyError("the active audit key comes from CXR_AUDIT_HMAC_KEY: rotate it in your secret store "
                            "(keep the old value available to verifiers, e.g. as a key file in the key folder)")
    if audit_mode() == "plain":
        raise AuditKeyError("CXR_AUDIT_MODE=plain: there is no key to rotate")
    _, key = _create_key(_key_dir())
    return key_id_for(key)


def mac(payload: bytes, key: bytes | None) -> str:
    if key:
        return hmac.new(key, payload, hashlib.sha256).hexdigest()
    return hashlib.sha256(payload).hexdigest()


# ------------------------------------------------------------------------------------ checkpoints
def checkpoint_path(database_url: str | None = None) -> Path:
    """The checkpoint file of a database: ``checkpoints.jsonl`` for the app database, a file named
    after the URL's fingerprint for any other database (tests, tools)."""
    settings = get_settings()
    folder = settings.audit_checkpoints_path
    if database_url is None or database_url == settings.app_database_url:
        return folder / CHECKPOINT_FILE
    return folder / f"checkpoints-{hashlib.sha256(database_url.encode()).hexdigest()[:12]}.jsonl"


_SIGNED = ("v", "seq", "head_hash", "time_utc", "reason", "key_id")


def write_checkpoint(seq: int, head_hash: str, *, reason: str, database_url: str | None = None) -> dict[str, Any]:
    """Append one MAC'd checkpoint line (seq, head hash) to the checkpoint file (0600, flock)."""
    active = active_key()
    kid, key = active if active else (None, None)
    line = {"v": 1, "seq": int(seq), "head_hash": head_hash, "time_utc": _utc_now(), "reason": reason[:80],
            "key_id": kid}
    line["mac"] = mac(canonical_json({k: line[k] for k in _SIGNED}).encode(), key)
    path = checkpoint_path(database_url)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, (canonical_json(line) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return line


@dataclass
class Checkpoint:
    line_no: int
    seq: int | None
    head_hash: str | None
    time_utc: str | None
    reason: str | None
    problem: str | None = None  # None: its MAC verifies
    missing_key: bool = False  # the problem is only that its key is not available here
    raw: dict[str, Any] = field(default_factory=dict)

    def name(self, path: Path) -> str:
        return f"checkpoint {path}:{self.line_no} (entry {self.seq}, {self.time_utc})"


def read_checkpoints(database_url: str | None = None) -> tuple[Path, list[Checkpoint]]:
    """Every checkpoint line with its MAC checked (``problem`` says why one does not verify)."""
    path = checkpoint_path(database_url)
    if not path.exists():
        return path, []
    out = []
    for i, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            d = json.loads(text)
            cp = Checkpoint(i, int(d["seq"]), str(d["head_hash"]), d.get("time_utc"), d.get("reason"), raw=d)
        except (ValueError, KeyError, TypeError):
            out.append(Checkpoint(i, None, None, None, None, problem="not a valid checkpoint line"))
            continue
        kid = d.get("key_id")
        try:
            key = key_by_id(kid) if kid else None
        except AuditKeyMissing as exc:
            cp.problem, cp.missing_key = str(exc), True
            out.append(cp)
            continue
        if kid is None and audit_mode() == "keyed":
            cp.problem = "unkeyed checkpoint in keyed mode (anyone can compute it)"
        elif not hmac.compare_digest(mac(canonical_json({k: d.get(k) for k in _SIGNED}).encode(), key),
                                     str(d.get("mac", ""))):
            cp.problem = "its MAC does not verify (the line was edited or forged)"
        out.append(cp)
    return path, out
