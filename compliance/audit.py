"""Tamper-evident audit trail (21 CFR Part 11 §11.10(e)).

Append-only and hash-chained: every entry stores the previous entry's hash and its own SHA-256
over a canonical JSON encoding of (seq, time, actor, role, action, subject, details, prev_hash).
Editing, deleting, inserting or reordering rows breaks the chain, and ``verify_chain`` names the
first bad entry. In keyed mode (``CXR_AUDIT_HMAC_KEY``, kept outside the database) the hash is an
HMAC-SHA-256, so an attacker who can write the database alone cannot rewrite the whole chain
consistently.

``details`` must never hold PHI: callers pass pseudonymous ids, counts, versions and hashes only.

Threats each mode covers
------------------------
=============================================  ==========================  ===========================
attacker / event                               plain SHA-256 chain         keyed (HMAC) chain
=============================================  ==========================  ===========================
accidental edit, bad migration, bit rot        detected                    detected
one row edited, deleted, inserted, reordered   detected (names the entry)  detected (names the entry)
  by hand in SQL without recomputing hashes
database-only attacker who recomputes every    NOT detected (hashes are    detected: the key is not in
  later hash after an edit                       public functions)           the database
attacker holding the HMAC key as well          not detected                not detected
truncation of the newest entries (tail)        not detected by verify      not detected by verify
=============================================  ==========================  ===========================

Tail truncation and whole-chain rewrites are caught by comparing with a head hash kept elsewhere:
every compliance report states the head hash and is itself recorded (``report.exported``), so an
exported report (kept outside the system) pins the trail up to that point. Keep the HMAC key
(``CXR_AUDIT_HMAC_KEY``) outside the database host's reach (secret store, environment of the API
process only); losing it makes the keyed chain unverifiable, so escrow it.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Integer, String, Text, select
from sqlalchemy.orm import Mapped, mapped_column

from app.config import get_settings
from compliance.db import Base, get_engine, session_scope

GENESIS_HASH = "0" * 64
_append_lock = threading.Lock()
# PostgreSQL advisory-lock key for appends (a fixed 64-bit number: "cxr audit" in ASCII)
AUDIT_APPEND_LOCK_KEY = int.from_bytes(b"cxraudit", "big") >> 1


class AuditEntry(Base):
    __tablename__ = "audit_trail"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    time_utc: Mapped[str] = mapped_column(String(40))
    actor: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(40))
    action: Mapped[str] = mapped_column(String(80), index=True)
    subject: Mapped[str] = mapped_column(String(200))
    details: Mapped[str] = mapped_column(Text)  # canonical JSON
    prev_hash: Mapped[str] = mapped_column(String(64))
    entry_hash: Mapped[str] = mapped_column(String(64))

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time_utc": self.time_utc,
            "actor": self.actor,
            "role": self.role,
            "action": self.action,
            "subject": self.subject,
            "details": json.loads(self.details),
            "prev_hash": self.prev_hash,
            "entry_hash": self.entry_hash,
        }


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _hmac_key() -> bytes | None:
    key = get_settings().audit_hmac_key
    return key.encode() if key else None


def compute_entry_hash(seq: int, time_utc: str, actor: str, role: str, action: str, subject: str,
                       details_json: str, prev_hash: str, key: bytes | None = None) -> str:
    payload = canonical_json(
        {"seq": seq, "time_utc": time_utc, "actor": actor, "role": role, "action": action,
         "subject": subject, "details": json.loads(details_json), "prev_hash": prev_hash}
    ).encode()
    if key:
        return hmac.new(key, payload, hashlib.sha256).hexdigest()
    return hashlib.sha256(payload).hexdigest()


def record_event(action: str, *, actor: str, role: str = "unknown", subject: str = "",
                 details: dict[str, Any] | None = None, database_url: str | None = None) -> dict[str, Any]:
    """Append one event to the audit trail and return it as a dict. Written by the code that acts."""
    details_json = canonical_json(details or {})
    key = _hmac_key()
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
            entry_hash = compute_entry_hash(seq, time_utc, actor, role, action, subject, details_json, prev_hash, key)
            row = {"seq": seq, "time_utc": time_utc, "actor": actor, "role": role, "action": action,
                   "subject": subject, "details": details_json, "prev_hash": prev_hash, "entry_hash": entry_hash}
            conn.execute(AuditEntry.__table__.insert().values(**row))
            conn.commit()
    row["details"] = json.loads(details_json)
    return row


@dataclass
class ChainVerification:
    ok: bool
    n_entries: int
    head_hash: str
    first_bad_seq: int | None = None
    message: str = "audit chain intact"

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "n_entries": self.n_entries, "head_hash": self.head_hash,
                "first_bad_seq": self.first_bad_seq, "message": self.message}


def verify_chain(database_url: str | None = None) -> ChainVerification:
    """Recompute every hash in sequence order; report the first entry that does not fit."""
    key = _hmac_key()
    with session_scope(database_url) as s:
        rows = s.execute(select(AuditEntry).order_by(AuditEntry.seq)).scalars().all()
        prev = GENESIS_HASH
        expected_seq = 1
        for row in rows:
            if row.seq != expected_seq:
                return ChainVerification(False, len(rows), prev, row.seq,
                                         f"entry {row.seq}: expected sequence number {expected_seq} "
                                         f"(an entry was deleted or inserted)")
            if row.prev_hash != prev:
                return ChainVerification(False, len(rows), prev, row.seq,
                                         f"entry {row.seq}: previous-hash link broken "
                                         f"(an entry before it was removed, inserted or reordered)")
            try:
                recomputed = compute_entry_hash(row.seq, row.time_utc, row.actor, row.role, row.action,
                                                row.subject, row.details, row.prev_hash, key)
            except (ValueError, TypeError):
                recomputed = ""
            if not hmac.compare_digest(recomputed, row.entry_hash):
                return ChainVerification(False, len(rows), prev, row.seq,
                                         f"entry {row.seq}: content does not match its hash (entry was edited)")
            prev = row.entry_hash
            expected_seq += 1
        return ChainVerification(True, len(rows), prev)


def list_events(start: str | None = None, end: str | None = None, action: str | None = None,
                database_url: str | None = None) -> list[dict[str, Any]]:
    """Entries with ``start <= time_utc < end`` (ISO strings compare in time order)."""
    with session_scope(database_url) as s:
        q = select(AuditEntry).order_by(AuditEntry.seq)
        if start:
            q = q.where(AuditEntry.time_utc >= start)
        if end:
            q = q.where(AuditEntry.time_utc < end)
        if action:
            q = q.where(AuditEntry.action == action)
        return [r.as_dict() for r in s.execute(q).scalars().all()]
