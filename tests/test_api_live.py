"""Real HTTP through uvicorn on 127.0.0.1 (subprocess): bounded load with a champion switch, and a crash test.

* Load: 16 concurrent clients for ~8 s (30 s with CXR_LONG_TESTS=1, as `make test` sets), and in any case
  until 20 s after a new champion is approved in the middle of the run (a real alias move through
  governance). 0 errors; every 200 has its row in the database; responses name the version that produced
  them, and every response later than 15 s after the switch (there must be some) names the new version.
* Crash: SIGKILL of the server in the middle of a load run, restart on the same state; every prediction
  that had been answered 200 is still there, SQLite's integrity check passes and the audit chain verifies.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time

import httpx
import pytest
from api_fixtures import Server, api_env  # noqa: F401
from dicom_factory import FAKE_PATIENT_NAME, make_dicom

LONG = os.environ.get("CXR_LONG_TESTS") == "1"
DURATION = 30.0 if LONG else 8.0
SETTLE = 15.0       # s after the switch from which no response may name the old version
LATE_WINDOW = 5.0   # s of load kept on after SETTLE, so that `late` responses exist
CLIENTS = 16
ACCESSION = "ACC-LIVE-7781"


def _images() -> list[bytes]:
    return [make_dicom(rows=160, cols=160, seed=s) for s in range(4)]


def _load(url: str, token: str, stop: threading.Event, results: list, errors: list, n_clients: int) -> list:
    images = _images()
    lock = threading.Lock()

    def worker(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {token}"}) as c:
            k = 0
            while not stop.is_set():
                k += 1
                try:
                    r = c.post("/v1/predictions", files={"image": ("x.dcm", images[(i + k) % 4], "application/dicom")},
                               data={"vitals": json.dumps({"age_years": 30 + i, "spo2_percent": 95}),
                                     "site": "site-a", "accession": ACCESSION})
                except httpx.HTTPError as exc:
                    with lock:
                        errors.append((time.time(), f"{type(exc).__name__}"))
                    time.sleep(0.1)
                    continue
                with lock:
                    if r.status_code == 200:
                        body = r.json()
                        results.append((time.time(), body["id"], body["model"]["version"]))
                    else:
                        errors.append((time.time(), f"{r.status_code} {r.text[:200]}"))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n_clients)]
    for t in threads:
        t.start()
    return threads


def _db_ids(api_env) -> set[str]:  # noqa: F811
    con = sqlite3.connect(api_env.home / "cxr.db")
    try:
        return {r[0] for r in con.execute("SELECT id FROM predictions")}
    finally:
        con.close()


@pytest.fixture(scope="module")
def server(api_env):  # noqa: F811
    srv = Server(api_env).start()
    yield srv
    srv.stop()


def test_load_with_champion_switch(api_env, server):  # noqa: F811
    old = httpx.get(server.url + "/readyz").json()["model_version"]
    results: list = []
    errors: list = []
    stop = threading.Event()
    t0 = time.time()
    threads = _load(server.url, api_env.tokens["clinician"], stop, results, errors, CLIENTS)
    time.sleep(DURATION / 3)
    new = api_env.new_champion()
    switched_at = time.time()
    # Keep the load on for DURATION and at least SETTLE + LATE_WINDOW s after the switch (the server polls
    # the alias every 0.5 s; in-flight requests of the old model finish within SETTLE), so responses issued
    # well after the switch exist; bounded by a hard deadline.
    deadline = switched_at + SETTLE + LATE_WINDOW + 60

    def late_results() -> list:
        return [v for ts, _, v in list(results) if ts > switched_at + SETTLE]

    while time.time() < deadline and (time.time() < max(t0 + DURATION, switched_at + SETTLE + LATE_WINDOW)
                                      or not any(v == new for _, _, v in list(results))
                                      or len(late_results()) < CLIENTS):
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    elapsed = time.time() - t0
    assert errors == [], errors[:5]
    assert len(results) > CLIENTS, f"only {len(results)} predictions in {elapsed:.1f} s"
    versions = {v for _, _, v in results}
    assert versions <= {old, new} and new in versions, versions
    # after the switch settled, nothing is served by the old version (and there are such late responses)
    late = late_results()
    assert len(late) >= CLIENTS, f"only {len(late)} responses later than {SETTLE} s after the switch"
    assert all(v == new for v in late), sorted(set(late))
    assert httpx.get(server.url + "/readyz").json()["model_version"] == new
    ids = {pid for _, pid, _ in results}
    assert ids <= _db_ids(api_env), "a 200 without its database row"
    print(f"\nload: {len(results)} predictions in {elapsed:.1f} s ({len(results) / elapsed:.1f}/s) from {CLIENTS} "
          f"clients, 0 errors, versions {sorted(versions)}")
    log = server.log.read_text(errors="replace")
    assert ACCESSION not in log and FAKE_PATIENT_NAME not in log
    for name in ("cxr.db", "cxr.db-wal"):  # no PHI at rest: neither the accession nor the DICOM's patient name
        path = api_env.home / name
        if path.exists():
            raw = path.read_bytes()
            assert ACCESSION.encode() not in raw and FAKE_PATIENT_NAME.encode() not in raw, name
    metrics = httpx.get(server.url + "/metrics").text
    assert f'model_version="{new}"' in metrics and ACCESSION not in metrics


def test_crash_sigkill_mid_load(api_env, server):  # noqa: F811
    from compliance.audit import list_events, verify_chain
    from core.config import reset_settings
    from core.db import dispose_engines

    results: list = []
    errors: list = []
    stop = threading.Event()
    threads = _load(server.url, api_env.tokens["clinician"], stop, results, errors, 8)
    deadline = time.time() + 60
    while len(results) < 25 and time.time() < deadline:
        time.sleep(0.05)
    server.kill()  # SIGKILL in the middle of the load
    stop.set()
    for t in threads:
        t.join(timeout=120)
    answered = {pid for _, pid, _ in results}
    assert len(answered) >= 25

    restarted = Server(api_env).start()
    try:
        dispose_engines()
        reset_settings()
        assert answered <= _db_ids(api_env), "an answered prediction was lost in the crash"
        with httpx.Client(base_url=restarted.url, headers=api_env.headers("clinician")) as c:
            for pid in list(answered)[:10]:
                assert c.get(f"/v1/predictions/{pid}").status_code == 200
            v = c.get("/v1/audit/verify", headers=api_env.headers("compliance_officer"))
            assert v.status_code == 200 and v.json()["ok"] is True, v.text
        con = sqlite3.connect(api_env.home / "cxr.db")
        try:
            assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            con.close()
        assert verify_chain().ok
        served = {e["details"]["prediction_id"] for e in list_events(action="prediction.served")}
        assert answered <= served
        print(f"\ncrash: {len(answered)} answered before SIGKILL, all present after restart; "
              f"{len(errors)} client errors after the kill (expected)")
    finally:
        restarted.stop()


def test_make_test_runs_the_long_load():
    """`make test` exports CXR_LONG_TESTS=1 (overridable), so the 30 s load run is the default there."""
    import re
    from pathlib import Path

    makefile = (Path(__file__).resolve().parent.parent / "Makefile").read_text()
    assert re.search(r"^export CXR_LONG_TESTS \?= 1[ \t]*$", makefile, re.MULTILINE), \
        "Makefile must contain the line `export CXR_LONG_TESTS ?= 1`"
