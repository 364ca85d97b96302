"""Governance against an insider, through a real uvicorn server and the real SQLite database.

* A ~1 MiB deflated DICOM that inflates to 1 GiB gets a 4xx problem, and the server process' peak
  resident memory (``VmHWM`` in /proc/PID/status, reset to the current RSS after a warm-up
  prediction) grows by < 100 MB.
* A 40 MB upload without a token gets 401 before its body is sent: the client sends the headers and
  64 KiB, and the answer arrives while 39.9 MB are still unsent (nothing is read, spooled or parsed).
* Failed authentication is rate limited per client: 429 problem+json with Retry-After, a bounded
  number of audit entries (one aggregate for the throttling), and a valid token still works.
* Every /v1 response carries ``Cache-Control: no-store``.
* Lockout: wrong passwords typed for someone else's name lock their *password* use only; their bearer
  token keeps working. The login failure message is the same for a wrong password, an unknown user and
  a locked account (even with the right password).
* Outcome "once" is a database constraint: two processes racing to record the first outcome of a
  prediction cannot both commit, and the API answers the loser 409 (or 200 for the same outcome).
* The database, its WAL and the generated secrets are created 0600, whatever the umask.
"""
from __future__ import annotations

import json
import os
import socket
import stat
import time

import httpx
import pytest
from api_fixtures import Server, api_env  # noqa: F401
from dicom_factory import make_dicom
from test_decompression_bomb import deflate_bomb


def _vm(pid: int, key: str) -> int:
    """A /proc/PID/status memory figure in bytes (VmHWM: peak resident set, VmRSS: current)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


@pytest.fixture(scope="module")
def server(api_env):  # noqa: F811
    srv = Server(api_env).start()
    yield srv
    srv.stop()


def test_deflate_bomb_through_the_real_api_keeps_peak_memory_bounded(server, api_env):  # noqa: F811
    bomb = deflate_bomb()
    headers = api_env.headers("clinician")
    with httpx.Client(base_url=server.url, timeout=120) as c:
        # warm-up: a real prediction (model, decoder, multipart paths all touched once)
        ok = c.post("/v1/predictions", headers=headers, files={"image": ("a.dcm", make_dicom(rows=256, cols=256),
                                                                       "application/dicom")})
        assert ok.status_code == 200, ok.text
        # reset the peak to the current RSS (clear_refs 5), so growth under an earlier peak still shows
        with open(f"/proc/{server.proc.pid}/clear_refs", "w") as fh:
            fh.write("5")
        before = _vm(server.proc.pid, "VmHWM")
        t0 = time.perf_counter()
        r = c.post("/v1/predictions", headers=headers, files={"image": ("bomb.dcm", bomb, "application/dicom")})
        seconds = time.perf_counter() - t0
        after = _vm(server.proc.pid, "VmHWM")
    growth = after - before
    record = (f"deflate bomb {len(bomb) / 2**20:.2f} MiB -> 1 GiB: HTTP {r.status_code} in {seconds:.2f} s; "
              f"server VmHWM {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB (+{growth / 2**20:.1f} MiB)")
    print(record)
    out = os.environ.get("CXR_BOMB_RESULT")
    if out:
        with open(out, "a") as fh:
            fh.write(record + "\n")
    assert growth < 100 * 10**6, record
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "image-refused/decompression-bomb", r.json()


def _raw_request(port: int, head: bytes, body_part: bytes, wait: float = 10.0) -> bytes:
    s = socket.create_connection(("127.0.0.1", port), timeout=wait)
    try:
        s.sendall(head + body_part)
        s.settimeout(wait)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        # the rest of the response (problem+json body)
        s.settimeout(2)
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        return data
    finally:
        s.close()


def test_unauthenticated_40mb_upload_is_refused_before_its_body_is_read(server):
    total = 40 * 1024 * 1024
    boundary = "cxrboundary"
    preamble = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.dcm\"\r\n"
                "Content-Type: application/dicom\r\n\r\n").encode()
    head = (f"POST /v1/predictions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
            f"boundary={boundary}\r\nContent-Length: {total}\r\n\r\n").encode()
    sent = preamble + b"\0" * (64 * 1024)
    t0 = time.perf_counter()
    data = _raw_request(server.port, head, sent)  # the other 39.9 MB are never sent
    seconds = time.perf_counter() - t0
    status_line = data.split(b"\r\n", 1)[0]
    assert b" 401 " in status_line, data[:500]
    assert b"application/problem+json" in data and b"www-authenticate: Bearer" in data.lower().replace(
        b"www-authenticate: bearer", b"www-authenticate: Bearer")
    assert seconds < 10
    # a bogus token gets the same treatment
    head_bogus = head.replace(b"Host: 127.0.0.1\r\n", b"Host: 127.0.0.1\r\nAuthorization: Bearer cxr_forged\r\n")
    data = _raw_request(server.port, head_bogus, sent)
    assert b" 401 " in data.split(b"\r\n", 1)[0] and b"invalid-token" in data


def test_failed_authentication_is_rate_limited_and_aggregated_in_the_audit(api_env):  # noqa: F811
    from fastapi.testclient import TestClient

    from app.main import create_app
    from compliance.audit import list_events
    from core.config import Settings

    app = create_app(Settings(auth_fail_burst=5, auth_fail_per_minute=6))
    n_audit = len(list_events())
    with TestClient(app, raise_server_exceptions=False) as c:
        codes = []
        for i in range(60):
            h = {"Authorization": f"Bearer cxr_guess-{i}"} if i % 2 else {}
            r = c.get("/v1/model", headers=h)
            codes.append(r.status_code)
            if r.status_code == 429:
                assert r.headers["content-type"] == "application/problem+json"
                assert r.json()["code"] == "too-many-failed-authentications"
                assert int(r.headers["retry-after"]) >= 1
        assert codes[:5] == [401] * 5 and set(codes[5:]) == {429}, codes
        # a valid token from the same client is never throttled
        import uuid

        r = c.get(f"/v1/predictions/{uuid.uuid4()}", headers=api_env.headers("clinician"))
        assert r.status_code == 404 and r.json()["code"] == "prediction-not-found"  # authenticated, no such id
    new = list_events()[n_audit:]
    actions = [e["action"] for e in new]
    assert actions.count("auth.rate_limited") == 1, actions
    assert actions.count("auth.login_failed") <= 3, actions  # the invalid tokens within the burst only
    assert len(new) <= 6, actions  # 60 failures → a handful of rows (+ the valid request's api.request)
    assert not any("cxr_guess" in json.dumps(e) for e in new)


def test_every_v1_response_is_no_store(server, api_env):  # noqa: F811
    with httpx.Client(base_url=server.url, timeout=60) as c:
        h = api_env.headers("clinician")
        r = c.post("/v1/predictions", headers=h, files={"image": ("a.dcm", make_dicom(), "application/dicom")})
        assert r.status_code == 200
        pid = r.json()["id"]
        responses = [r, c.get(f"/v1/predictions/{pid}", headers=h), c.get(f"/v1/predictions/{pid}/heatmap", headers=h),
                     c.get(f"/v1/predictions/{pid}", headers=api_env.headers("clinician_b")),  # 404
                     c.get("/v1/model", headers=h), c.get("/v1/model"),  # 401
                     c.post(f"/v1/predictions/{pid}/outcome", headers=h, json={"rtpcr_result": "negative"})]
    for resp in responses:
        assert resp.headers.get("cache-control") == "no-store", (resp.request.url, resp.status_code, resp.headers)


def test_lockout_is_password_only_and_login_failures_look_alike(api_env):  # noqa: F811
    from fastapi.testclient import TestClient

    from app.main import create_app
    from compliance.users import (
        AUTH_FAILED,
        MAX_FAILED_LOGINS,
        AuthenticationError,
        authenticate_password,
        create_user,
        get_user,
        issue_token,
    )

    create_user("victim-clin", "clinician", api_env.password, actor="test", sites=["site-a"])
    token = issue_token("victim-clin", actor="test")
    messages = set()
    for _ in range(MAX_FAILED_LOGINS):  # an attacker types wrong passwords for the victim's name
        with pytest.raises(AuthenticationError) as exc:
            authenticate_password("victim-clin", "Wrong-but-long-guess-1")
        messages.add(str(exc.value))
    assert get_user("victim-clin").locked
    with pytest.raises(AuthenticationError) as exc:  # locked: even the right password fails, same message
        authenticate_password("victim-clin", api_env.password)
    messages.add(str(exc.value))
    with pytest.raises(AuthenticationError) as exc:
        authenticate_password("no-such-user-x", "Wrong-but-long-guess-1")
    messages.add(str(exc.value))
    assert messages == {AUTH_FAILED}, messages
    # ... but the victim's token still works
    with TestClient(create_app(), raise_server_exceptions=False) as c:
        import uuid

        r = c.get(f"/v1/predictions/{uuid.uuid4()}", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 404 and r.json()["code"] == "prediction-not-found"  # authenticated (not 401)


def _first_outcome_in_subprocess(args) -> str:
    home, project, pid, cls = args
    os.environ.update({"CXR_HOME": home, "CXR_PROJECT_ROOT": project})
    from sqlalchemy.exc import IntegrityError

    from app import storage

    try:
        storage.save_outcome({"prediction_id": pid, "confirmed_class": cls, "rtpcr_result": None,
                              "truth_positive": cls == "covid19", "recorded_by": "racer", "recorded_at": storage.utc_now(),
                              "supersedes_id": None, "correction_reason": None, "signed_by": None,
                              "signature_meaning": None})
        return "committed"
    except IntegrityError:
        return "refused"


def test_two_processes_cannot_both_record_a_first_outcome(server, api_env, monkeypatch):  # noqa: F811
    import multiprocessing as mp

    from app import storage

    with httpx.Client(base_url=server.url, timeout=60) as c:
        h = api_env.headers("clinician")
        pid = c.post("/v1/predictions", headers=h, files={"image": ("a.dcm", make_dicom(seed=3), "application/dicom")}
                     ).json()["id"]
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.map(_first_outcome_in_subprocess, [(str(api_env.home), str(api_env.project), pid, "covid19"),
                                                            (str(api_env.home), str(api_env.project), pid, "normal")])
    assert sorted(results) == ["committed", "refused"], results
    rows = storage.outcomes_for(pid)
    assert len(rows) == 1 and rows[0]["supersedes_id"] is None
    # a second replica that checked before the first committed: the API answers from the database
    from fastapi.testclient import TestClient

    from app.main import create_app

    monkeypatch.setattr(storage, "current_outcome", lambda _pid, _real=storage.current_outcome: None)
    with TestClient(create_app(), raise_server_exceptions=False) as c:
        other = "normal" if rows[0]["confirmed_class"] == "covid19" else "covid19"
        r = c.post(f"/v1/predictions/{pid}/outcome", headers=api_env.headers("clinician"),
                   json={"confirmed_class": other})
        assert r.status_code == 409 and r.json()["code"] == "outcome-conflict", r.text
    assert len(storage.outcomes_for(pid)) == 1


def test_state_files_are_created_private_whatever_the_umask(tmp_path, monkeypatch):
    from core.config import get_settings, reset_settings
    from core.db import dispose_engines, get_engine, session_scope

    home = tmp_path / "fresh-home"
    monkeypatch.setenv("CXR_HOME", str(home))
    monkeypatch.delenv("CXR_DATABASE_URL", raising=False)
    monkeypatch.delenv("CXR_PSEUDONYM_KEY", raising=False)
    dispose_engines()
    reset_settings()
    old = os.umask(0o022)
    try:
        get_engine()
        from compliance.audit import record_event

        record_event("test.event", actor="t", role="admin", subject="s", details={})
        with session_scope():
            pass
        get_settings().secret("pseudonym_key")
        for name in ("cxr.db", "cxr.db-wal", "cxr.db-shm", "secrets/pseudonym_key"):
            path = home / name
            assert path.exists(), name
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == 0o600, (name, oct(mode))
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        assert stat.S_IMODE((home / "secrets").stat().st_mode) == 0o700
    finally:
        os.umask(old)
        dispose_engines()
        reset_settings()
