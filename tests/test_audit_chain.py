"""Audit trail: append, verify, and detection of each kind of tampering made directly in SQL."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from app_db import execute

pytestmark = pytest.mark.app_databases  # SQLite and PostgreSQL
REPO = Path(__file__).resolve().parent.parent


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
    ((head,),) = execute("SELECT entry_hash FROM audit_trail ORDER BY seq DESC LIMIT 1")
    rows = execute("SELECT seq, prev_hash, entry_hash FROM audit_trail ORDER BY seq")
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

    execute(sql)
    v = verify_chain()
    assert not v.ok
    assert v.first_bad_seq == bad_seq
    assert f"entry {bad_seq}" in v.message


def test_reorder_is_detected(trail):
    from compliance.audit import verify_chain

    execute("UPDATE audit_trail SET seq=-2 WHERE seq=2")
    execute("UPDATE audit_trail SET seq=2 WHERE seq=3")
    execute("UPDATE audit_trail SET seq=3 WHERE seq=-2")
    v = verify_chain()
    assert not v.ok and v.first_bad_seq == 2


def test_keyed_mode_rejects_rehashed_chain(trail, monkeypatch, app_db_backend, request):
    """An attacker with DB access rewrites an entry and recomputes plain SHA-256 hashes: keyed mode catches it."""
    from compliance.audit import compute_entry_hash, record_event, verify_chain
    from core.config import reset_settings

    monkeypatch.setenv("CXR_AUDIT_HMAC_KEY", "k" * 32)
    reset_settings()
    # fresh keyed trail in a second database
    if app_db_backend == "postgresql":
        _, url = request.getfixturevalue("postgres_server").create_database("keyed")
    else:
        url = f"sqlite:///{trail / 'home' / 'keyed.db'}"
    for i in range(3):
        record_event("test.event", actor="bob", role="approver", subject=f"s{i}", database_url=url)
    assert verify_chain(url).ok
    rows = execute("SELECT seq,time_utc,actor,role,action,subject,details,prev_hash FROM audit_trail ORDER BY seq",
                   url=url)
    prev = "0" * 64
    for seq, t, actor, role, action, subject, details, _ in rows:
        actor = "mallory" if seq == 2 else actor
        h = compute_entry_hash(seq, t, actor, role, action, subject, details, prev, key=None)
        execute("UPDATE audit_trail SET actor=:a, prev_hash=:p, entry_hash=:h WHERE seq=:s",
                {"a": actor, "p": prev, "h": h, "s": seq}, url=url)
        prev = h
    v = verify_chain(url)
    assert not v.ok and v.first_bad_seq == 1


def test_concurrent_appends_from_processes_keep_one_chain(cxr_env):
    """Several processes append at once (as API replicas do): the database-level lock (BEGIN IMMEDIATE on
    SQLite, pg_advisory_xact_lock on PostgreSQL) must leave one chain, no duplicate or skipped sequence."""
    from compliance.audit import list_events, record_event, verify_chain

    record_event("test.event", actor="a", subject="warm-up")  # creates the tables once
    code = ("import sys\nfrom compliance.audit import record_event\nsys.stdin.readline()\n"
            "for i in range(15):\n    record_event('test.event', actor=sys.argv[1], subject=f's{i}', details={'i': i})\n")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, "-c", code, f"w{n}"], stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=env, text=True) for n in range(3)]
    for p in procs:  # start line: all three are imported and race from here
        p.stdin.write("go\n")
        p.stdin.flush()
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errs
    v = verify_chain()
    assert v.ok and v.n_entries == 46, v.message
    seqs = [e["seq"] for e in list_events()]
    assert seqs == list(range(1, 47))


def test_postgres_append_only_grants(trail, app_db_backend):
    """PostgreSQL: with UPDATE/DELETE revoked on the audit table (append-only for the application role),
    appending still works (an advisory lock needs no table privilege; LOCK TABLE ... EXCLUSIVE would) and
    editing is refused by the database itself."""
    if app_db_backend != "postgresql":
        pytest.skip("PostgreSQL grants (SQLite has no privileges)")
    import sqlalchemy as sa

    from compliance.audit import record_event, verify_chain

    execute("REVOKE UPDATE, DELETE, TRUNCATE ON audit_trail FROM CURRENT_USER")
    record_event("test.event", actor="alice", subject="after-revoke")
    with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
        execute("UPDATE audit_trail SET actor='mallory' WHERE seq=1")
    v = verify_chain()
    assert v.ok and v.n_entries == 6
