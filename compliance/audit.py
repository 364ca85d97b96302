"""Tamper-evident audit trail (21 CFR Part 11 §11.10(e)), anchored outside the database.

Append-only and hash-chained: every entry stores the previous entry's hash and its own MAC over a
canonical JSON encoding of (seq, time, actor, role, action, subject, details, prev_hash[, key_id]).
Editing, deleting, inserting or reordering rows breaks the chain, and ``verify_chain`` names the
first bad entry.

* **Keyed by default**: the MAC is HMAC-SHA-256 with a key kept outside the database
  (``compliance.audit_anchor``: ``CXR_AUDIT_HMAC_KEY`` or a 0600 key file under
  ``CXR_HOME/secrets/audit-keys``); each entry names its key id, so keys rotate and a missing key
  is reported as such. Every writer (API, CLI, training, pipelines) uses that one key source.
  ``CXR_AUDIT_MODE=plain`` (plain SHA-256) is a development opt-out.
* **Checkpoints**: (seq, head hash) MAC'd lines appended to a file outside the database after every
  governance entry (every action but the high-volume ``CHECKPOINT_EXEMPT`` ones), periodically by the
  API and by ``cxr audit checkpoint``. ``verify_chain`` checks the chain against them, so deleting
  the newest entries (tail truncation) is detected and names the checkpoint it contradicts.
* **Rows**: ``prediction.served`` and ``outcome.recorded`` entries carry ``row_sha256``, the SHA-256
  of the stored row (``row_sha256``); ``verify_chain`` recomputes it from the ``predictions`` /
  ``outcomes`` tables, and reports rows that have no entry.

``details`` must never hold PHI: callers pass pseudonymous ids, counts, versions and hashes only.
The threats each mode covers are in docs/SECURITY.md.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import select

from compliance.audit_anchor import (
    AuditKeyMissing,
    active_key,
    audit_mode,
    canonical_json,
    key_by_id,
    read_checkpoints,
    write_checkpoint,
)
from core.db import get_engine, session_scope
from core.schema import AuditEntry, OutcomeRow, PredictionRow

__all__ = ["canonical_json", "record_event", "verify_chain", "list_events", "checkpoint", "row_sha256",
           "parse_utc", "ChainVerification", "GENESIS_HASH", "verify_entry", "get_entry", "head"]

log = logging.getLogger("cxr.audit")
GENESIS_HASH = "0" * 64
_append_lock = threading.Lock()
# High-volume actions: covered by the API's periodic checkpoint instead of one checkpoint each.
CHECKPOINT_EXEMPT = frozenset({"prediction.served", "outcome.recorded", "api.request", "auth.login_failed"})
# A row stored this recently may not have its audit entry yet (the entry follows the commit).
ROW_GRACE_SECONDS = 60
# PostgreSQL advisory-lock key for appends (a fixed 64-bit number: "cxr audit" in ASCII)
AUDIT_APPEND_LOCK_KEY = int.from_bytes(b"cxraudit", "big") >> 1


def compute_entry_hash(seq: int, time_utc: str, actor: str, role: str, action: str, subject: str,
                       details_json: str, prev_hash: str, key: bytes | None = None,
                       key_id: str | None = None) -> str:
    body = {"seq": seq, "time_utc": time_utc, "actor": actor, "role": role, "action": action,
            "subject": subject, "details": json.loads(details_json), "prev_hash": prev_hash}
    if key_id is not None:  # bound into the MAC (plain/legacy entries hash as before)
        body["key_id"] = key_id
    payload = canonical_json(body).encode()
    if key:
        return hmac.new(key, payload, hashlib.sha256).hexdigest()
    return hashlib.sha256(payload).hexdigest()


def row_sha256(obj: Any) -> str:
    """SHA-256 of a stored row (every column, as stored): what ``prediction.served`` / ``outcome.recorded``
    entries carry, so an edited or replaced row no longer matches its audit entry. NULL columns are left
    out, so a nullable column added by a later migration does not change the hash of older rows (setting
    or clearing a value still does)."""
    return hashlib.sha256(canonical_json({c.name: getattr(obj, c.name) for c in obj.__table__.columns
                                          if getattr(obj, c.name) is not None}).encode()).hexdigest()


def record_event(action: str, *, actor: str, role: str = "unknown", subject: str = "",
                 details: dict[str, Any] | None = None, database_url: str | None = None,
                 rows: tuple = ()) -> dict[str, Any]:
    """Append one event to the audit trail and return it as a dict. Written by the code that acts.

    ``rows``: ORM rows (of ``core.schema`` tables, keys already set) inserted in the same transaction,
    before the entry: the row and the entry that records it commit together, with one durable write
    (the prediction service stores each prediction this way)."""
    details_json = canonical_json(details or {})
    active = active_key()  # the one key source every writer uses (compliance.audit_anchor)
    key_id, key = active if active else (None, None)
    engine = get_engine(database_url)
    with _append_lock:
        # BEGIN IMMEDIATE on SQLite serialises writers across processes, so two processes never
        # take the same sequence number. PostgreSQL: a transaction-scoped advisory lock does the same
        # across API replicas (released at commit/rollback; needs no UPDATE/DELETE grant on the table,
        # so the audit table may be INSERT/SELECT-only for the application role).
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            elif engine.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({AUDIT_APPEND_LOCK_KEY})")
            else:
                conn.exec_driver_sql("LOCK TABLE audit_trail IN EXCLUSIVE MODE")
            last = conn.execute(
                select(AuditEntry.seq, AuditEntry.entry_hash).order_by(AuditEntry.seq.desc()).limit(1)
            ).first()
            seq = (last.seq + 1) if last else 1
            prev_hash = last.entry_hash if last else GENESIS_HASH
            time_utc = datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
            entry_hash = compute_entry_hash(seq, time_utc, actor, role, action, subject, details_json, prev_hash,
                                            key, key_id)
            row = {"seq": seq, "time_utc": time_utc, "actor": actor, "role": role, "action": action,
                   "subject": subject, "details": details_json, "prev_hash": prev_hash, "entry_hash": entry_hash,
                   "key_id": key_id}
            for obj in rows:
                conn.execute(obj.__table__.insert().values(
                    **{c.name: getattr(obj, c.name) for c in obj.__table__.columns if getattr(obj, c.name) is not None}))
            conn.execute(AuditEntry.__table__.insert().values(**row))
            conn.commit()
    if action not in CHECKPOINT_EXEMPT:
        try:
            write_checkpoint(seq, entry_hash, reason=action, database_url=database_url)
        except OSError as exc:  # the entry is committed; a missing checkpoint shows at verification
            log.error("audit checkpoint after entry %s could not be written: %s", seq, type(exc).__name__)
    row["details"] = json.loads(details_json)
    return row


def head(database_url: str | None = None) -> tuple[int, str]:
    """(seq, entry hash) of the newest entry ((0, genesis) for an empty trail)."""
    with session_scope(database_url) as s:
        last = s.execute(select(AuditEntry.seq, AuditEntry.entry_hash).order_by(AuditEntry.seq.desc()).limit(1)).first()
    return (last.seq, last.entry_hash) if last else (0, GENESIS_HASH)


def get_entry(seq: int, database_url: str | None = None) -> dict[str, Any] | None:
    with session_scope(database_url) as s:
        row = s.get(AuditEntry, seq)
        return row.as_dict() if row else None


def verify_entry(seq: int, database_url: str | None = None) -> tuple[bool, str]:
    """One entry's MAC recomputes with its key (keyed mode: the entry must be keyed). Not the chain:
    ``verify_chain`` checks links, order and checkpoints; this is the quick check serving makes."""
    with session_scope(database_url) as s:
        row = s.get(AuditEntry, seq)
        if row is None:
            return False, f"entry {seq} does not exist"
        if row.key_id is None and audit_mode() == "keyed":
            return False, f"entry {seq} is not keyed"
        try:
            key = key_by_id(row.key_id) if row.key_id else None
        except AuditKeyMissing as exc:
            return False, str(exc)
        recomputed = compute_entry_hash(row.seq, row.time_utc, row.actor, row.role, row.action, row.subject,
                                        row.details, row.prev_hash, key, row.key_id)
        if not hmac.compare_digest(recomputed, row.entry_hash):
            return False, f"entry {seq}: content does not match its MAC"
        return True, "ok"


def checkpoint(reason: str = "manual", database_url: str | None = None, *, if_moved: bool = False) -> dict[str, Any] | None:
    """Write a checkpoint of the current head (``if_moved``: only when the head moved since the last one)."""
    seq, h = head(database_url)
    if seq == 0:
        return None
    if if_moved:
        _, cps = read_checkpoints(database_url)
        if any(cp.seq == seq and cp.head_hash == h and cp.problem is None for cp in cps[-5:]):
            return None
    return write_checkpoint(seq, h, reason=reason, database_url=database_url)


@dataclass
class ChainVerification:
    ok: bool
    n_entries: int
    head_hash: str
    first_bad_seq: int | None = None
    message: str = "audit chain intact"
    status: str = "intact"  # intact | broken | unverifiable (a key is missing)
    mode: str = "keyed"
    problems: list[str] = field(default_factory=list)
    checkpoint: dict[str, Any] | None = None  # the newest checkpoint the chain agrees with
    rows: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "n_entries": self.n_entries, "head_hash": self.head_hash,
                "first_bad_seq": self.first_bad_seq, "message": self.message, "status": self.status,
                "mode": self.mode, "problems": list(self.problems), "checkpoint": self.checkpoint,
                "rows": dict(self.rows)}


def _chain(rows: list[AuditEntry], mode: str) -> tuple[dict[int, str], list[tuple[int | None, str, str]]]:
    """(seq → stored hash of the entries that verify in order, [(seq, kind, message)] problems)."""
    problems: list[tuple[int | None, str, str]] = []
    hashes: dict[int, str] = {}
    keys: dict[str, bytes] = {}
    prev, expected_seq, seen_keyed = GENESIS_HASH, 1, False
    for row in rows:
        if row.seq != expected_seq:
            problems.append((row.seq, "broken", f"entry {row.seq}: expected sequence number {expected_seq} "
                                                 f"(an entry was deleted or inserted)"))
            break
        if row.prev_hash != prev:
            problems.append((row.seq, "broken", f"entry {row.seq}: previous-hash link broken "
                                                 f"(an entry before it was removed, inserted or reordered)"))
            break
        key = None
        if row.key_id:
            seen_keyed = True
            if row.key_id not in keys:
                try:
                    keys[row.key_id] = key_by_id(row.key_id)
                except AuditKeyMissing as exc:
                    problems.append((row.seq, "unverifiable", f"entry {row.seq}: {exc}"))
                    break
            key = keys[row.key_id]
        elif mode == "keyed" and seen_keyed:
            problems.append((row.seq, "broken", f"entry {row.seq}: unkeyed (plain SHA-256) entry after keyed "
                                                 f"entries: written or rewritten without the audit key"))
            break
        try:
            recomputed = compute_entry_hash(row.seq, row.time_utc, row.actor, row.role, row.action, row.subject,
                                            row.details, row.prev_hash, key, row.key_id)
        except (ValueError, TypeError):
            recomputed = ""
        if not hmac.compare_digest(recomputed, row.entry_hash):
            problems.append((row.seq, "broken", f"entry {row.seq}: content does not match its hash (entry was edited)"))
            break
        hashes[row.seq] = row.entry_hash
        prev = row.entry_hash
        expected_seq += 1
    return hashes, problems


def _checkpoints(hashes: dict[int, str], n_last: int, needs_checkpoint: bool, mode: str,
                 database_url: str | None) -> tuple[dict[str, Any] | None, list[tuple[int | None, str, str]]]:
    path, cps = read_checkpoints(database_url)
    problems: list[tuple[int | None, str, str]] = []
    agreeing = None
    for cp in cps:
        if cp.problem:
            problems.append((None, "unverifiable" if cp.missing_key else "broken",
                             f"checkpoint {path}:{cp.line_no}: {cp.problem}"))
            continue
        if cp.seq > n_last:
            problems.append((n_last + 1, "broken",
                             f"{cp.name(path)} disagrees: it records entry {cp.seq} (head {cp.head_hash[:16]}…) but "
                             f"the trail ends at entry {n_last}: entries {n_last + 1}..{cp.seq} were deleted"))
        elif cp.seq in hashes and hashes[cp.seq] != cp.head_hash:
            problems.append((cp.seq, "broken",
                             f"{cp.name(path)} disagrees: entry {cp.seq} has hash {hashes[cp.seq][:16]}… but the "
                             f"checkpoint records {cp.head_hash[:16]}… (the trail was rewritten up to entry {cp.seq})"))
        elif cp.seq in hashes:
            if agreeing is None or cp.seq >= agreeing["seq"]:
                agreeing = {"file": str(path), "line": cp.line_no, "seq": cp.seq, "head_hash": cp.head_hash,
                            "time_utc": cp.time_utc}
    if not cps and needs_checkpoint and mode == "keyed":
        problems.append((None, "broken", f"no checkpoint found in {path} although the trail holds governance entries "
                                         f"(checkpoints deleted?); if this is an upgraded installation, check the "
                                         f"trail and run `cxr audit checkpoint`"))
    return agreeing, problems


def _row_problems(entries: list[AuditEntry], s) -> tuple[dict[str, int], list[tuple[int | None, str, str]]]:
    """Recompute the row hash of every prediction/outcome the trail names; report rows without an entry."""
    problems: list[tuple[int | None, str, str]] = []
    counts = {"predictions_verified": 0, "outcomes_verified": 0, "rows_without_hash": 0}
    now = datetime.now(timezone.utc)
    for table, action, id_key, label in ((PredictionRow, "prediction.served", "prediction_id", "prediction"),
                                         (OutcomeRow, "outcome.recorded", "outcome_id", "outcome")):
        rows = {str(r.id): r for r in s.execute(select(table)).scalars().all()}
        named: set[str] = set()
        for e in entries:
            if e.action != action:
                continue
            try:
                d = json.loads(e.details)
            except ValueError:
                continue
            rid = d.get(id_key)
            if rid is None:
                continue
            rid = str(rid)
            named.add(rid)
            want = d.get("row_sha256")
            if not want:
                counts["rows_without_hash"] += 1
                continue
            row = rows.get(rid)
            if row is None:
                problems.append((e.seq, "broken", f"entry {e.seq}: the {label} row {rid} it records is missing (deleted)"))
            elif not hmac.compare_digest(row_sha256(row), str(want)):
                problems.append((e.seq, "broken", f"entry {e.seq}: the stored {label} row {rid} does not match the "
                                                   f"hash recorded when it was written (row edited)"))
            else:
                counts[f"{label}s_verified"] += 1
        for rid, row in rows.items():
            if rid in named:
                continue
            stamp = row.created_at if label == "prediction" else row.recorded_at
            try:
                age = (now - parse_utc(stamp)).total_seconds()
            except ValueError:
                age = None
            if age is not None and 0 <= age < ROW_GRACE_SECONDS:
                continue  # just stored: its entry follows the commit
            problems.append((None, "broken", f"{label} row {rid} has no {action} audit entry "
                                              f"(inserted outside the service)"))
    return counts, problems


def verify_chain(database_url: str | None = None) -> ChainVerification:
    """Recompute every MAC in sequence order, check the chain against the checkpoints kept outside the
    database, and recompute the row hashes of predictions and outcomes. Reports the first problem
    (``message``, ``first_bad_seq``) and all of them (``problems``)."""
    mode = audit_mode()
    with session_scope(database_url) as s:
        entries = s.execute(select(AuditEntry).order_by(AuditEntry.seq)).scalars().all()
        hashes, problems = _chain(entries, mode)
        n_last = entries[-1].seq if entries else 0
        needs = any(e.action not in CHECKPOINT_EXEMPT for e in entries)
        agreeing, cp_problems = _checkpoints(hashes, n_last, needs, mode, database_url)
        counts, row_problems = _row_problems(entries, s)
    problems = problems + cp_problems + row_problems
    head_hash = entries[-1].entry_hash if entries and not problems else (
        hashes[max(hashes)] if hashes else GENESIS_HASH)
    if not problems:
        return ChainVerification(True, len(entries), head_hash, mode=mode, checkpoint=agreeing, rows=counts,
                                 message="audit chain intact" + (
                                     f"; agrees with checkpoint of entry {agreeing['seq']}" if agreeing else ""))
    first_seq, kind, message = problems[0]
    status = "unverifiable" if all(k == "unverifiable" for _, k, _ in problems) else "broken"
    return ChainVerification(False, len(entries), head_hash, first_seq, message, status=status, mode=mode,
                             problems=[m for _, _, m in problems], checkpoint=agreeing, rows=counts)


def parse_utc(text: str | datetime) -> datetime:
    """An ISO-8601 time (``Z`` or offset; naive = UTC; a bare date = its midnight) as an aware UTC datetime."""
    if isinstance(text, datetime):
        dt = text
    else:
        t = str(text).strip()
        dt = datetime.fromisoformat(t[:-1] + "+00:00" if t.endswith("Z") else t)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc)


def in_period(time_text: str | None, start: datetime | None, end: datetime | None) -> bool:
    """``start <= time < end`` on parsed times (never string order)."""
    if time_text is None:
        return False
    try:
        t = parse_utc(time_text)
    except ValueError:
        return False
    return (start is None or t >= start) and (end is None or t < end)


def coarse_bounds(start: datetime | None, end: datetime | None) -> tuple[str | None, str | None]:
    """Day-wide string bounds for a SQL prefilter that surely includes [start, end) (exact filter after)."""
    lo = (start - timedelta(days=1)).strftime("%Y-%m-%d") if start else None
    hi = (end + timedelta(days=2)).strftime("%Y-%m-%d") if end else None
    return lo, hi


def list_events(start: str | datetime | None = None, end: str | datetime | None = None, action: str | None = None,
                database_url: str | None = None) -> list[dict[str, Any]]:
    """Entries with ``start <= time_utc < end``, comparing parsed times (an event 0.5 s after a boundary
    belongs to the period that starts there)."""
    s_dt = parse_utc(start) if start else None
    e_dt = parse_utc(end) if end else None
    lo, hi = coarse_bounds(s_dt, e_dt)
    with session_scope(database_url) as s:
        q = select(AuditEntry).order_by(AuditEntry.seq)
        if lo:
            q = q.where(AuditEntry.time_utc >= lo)
        if hi:
            q = q.where(AuditEntry.time_utc < hi)
        if action:
            q = q.where(AuditEntry.action == action)
        rows = s.execute(q).scalars().all()
        if s_dt is None and e_dt is None:
            return [r.as_dict() for r in rows]
        return [r.as_dict() for r in rows if in_period(r.time_utc, s_dt, e_dt)]
