"""Audit trail: append, verify, and detection of each kind of tampering made directly in SQL."""
from __future__ import annotations

import sqlite3

import pytest


def _db_path(env):
    return env / "home" / "cxr.db"


@pytest.fixture()
def trail(cxr_env):
    from compliance.audit import record_event

    for i in range(5):
        record_event("test.event", actor="alice", role="researcher", subject=f"thing/{i}", details={"n": i})
    return cxr_env


def test_intact_chain_verifies(trail):
    from compliance.audit import verify_chain

    v = verify_chain()
    assert v.ok and v.n_entries == 5 and v.first_bad_seq is None
    assert len(v.head_hash) == 64
    con = sqlite3.connect(_db_path(trail))
    try:
        (head,) = con.execute("SELECT entry_hash FROM audit_trail ORDER BY seq DESC LIMIT 1").fetchone()
        rows = con.execute("SELECT seq, prev_hash, entry_hash FROM audit_trail ORDER BY seq").fetchall()
    finally:
        con.close()
    assert v.head_hash == head
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0][1] == "0" * 64  # genesis
    assert all(rows[i][1] == rows[i - 1][2] for i in range(1, len(rows)))  # each entry links to the one before


@pytest.mark.parametrize(
    "sql, bad_seq",
    [
        ("UPDATE audit_trail SET details='{\"n\":99}' WHERE seq=3", 3),
        ("UPDATE audit_trail SET actor='mallory' WHERE seq=2", 2),
        ("DELETE FROM audit_trail WHERE seq=3", 4),
        ("UPDATE audit_trail SET time_utc='2020-01-01T00:00:00Z' WHERE seq=5", 5),
    ],
)
def test_tampering_is_detected_and_named(trail, sql, bad_seq):
    from compliance.audit import verify_chain

    con = sqlite3.connect(_db_path(trail))
    con.execute(sql)
    con.commit()
    con.close()
    v = verify_chain()
    assert not v.ok
    assert v.first_bad_seq == bad_seq
    assert f"entry {bad_seq}" in v.message


def test_reorder_is_detected(trail):
    from compliance.audit import verify_chain

    con = sqlite3.connect(_db_path(trail))
    con.execute("UPDATE audit_trail SET seq=-2 WHERE seq=2")
    con.execute("UPDATE audit_trail SET seq=2 WHERE seq=3")
    con.execute("UPDATE audit_trail SET seq=3 WHERE seq=-2")
    con.commit()
    con.close()
    v = verify_chain()
    assert not v.ok and v.first_bad_seq == 2


def test_keyed_mode_rejects_rehashed_chain(trail, monkeypatch):
    """An attacker with DB access rewrites an entry and recomputes plain SHA-256 hashes: keyed mode catches it."""
    from compliance.audit import compute_entry_hash, record_event, verify_chain
    from core.config import reset_settings

    monkeypatch.setenv("CXR_AUDIT_HMAC_KEY", "k" * 32)
    reset_settings()
    # fresh keyed trail in a second database
    url = f"sqlite:///{trail / 'home' / 'keyed.db'}"
    for i in range(3):
        record_event("test.event", actor="bob", role="approver", subject=f"s{i}", database_url=url)
    assert verify_chain(url).ok
    con = sqlite3.connect(trail / "home" / "keyed.db")
    rows = con.execute("SELECT seq,time_utc,actor,role,action,subject,details,prev_hash FROM audit_trail ORDER BY seq").fetchall()
    prev = "0" * 64
    for seq, t, actor, role, action, subject, details, _ in rows:
        actor = "mallory" if seq == 2 else actor
        h = compute_entry_hash(seq, t, actor, role, action, subject, details, prev, key=None)
        con.execute("UPDATE audit_trail SET actor=?, prev_hash=?, entry_hash=? WHERE seq=?", (actor, prev, h, seq))
        prev = h
    con.commit()
    con.close()
    v = verify_chain(url)
    assert not v.ok and v.first_bad_seq == 1
