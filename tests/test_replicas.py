"""Two API replicas on one database, SIGKILL of one half way through a load run (issue 17).

Each replica is a real uvicorn process (``cxr serve``) on the same app database — PostgreSQL (the
deployment case) and SQLite (one file, its file lock) — and the same CXR_HOME secrets, as in
``deploy/k8s``. 8 clients per replica post predictions; replica A is SIGKILLed half way. Then:

* replica B answered every request 2xx (none of its clients saw an error);
* every prediction either replica answered 200 is readable from B (nothing answered is lost);
* the audit chain (entries, checkpoints, prediction row hashes, e-signatures) verifies through B;
* "one first outcome per prediction" holds across replicas: the same prediction's first outcome posted
  to both replicas at once is stored once.

``CXR_REPLICA_RESULT=FILE`` writes the counts and latencies (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import json
import os
import statistics
import threading
import time

import httpx
import pytest
from api_fixtures import Server, api_env  # noqa: F401
from dicom_factory import make_dicom

pytestmark = pytest.mark.app_databases  # SQLite and PostgreSQL

LONG = os.environ.get("CXR_LONG_TESTS") == "1"
DURATION = 30.0 if LONG else 10.0
CLIENTS_PER_REPLICA = 8


def _run_load(servers: dict[str, Server], token: str, kill: str, duration: float) -> dict:
    images = [make_dicom(rows=128, cols=128, seed=s) for s in range(4)]
    stop = threading.Event()
    lock = threading.Lock()
    out = {name: {"ok": [], "errors": [], "latency": []} for name in servers}
    killed_at: list[float] = []

    def worker(name: str, i: int) -> None:
        with httpx.Client(base_url=servers[name].url, timeout=60,
                          headers={"Authorization": f"Bearer {token}"}) as c:
            k = 0
            while not stop.is_set():
                k += 1
                t0 = time.perf_counter()
                try:
                    r = c.post("/v1/predictions", files={"image": ("x.dcm", images[(i + k) % 4], "application/dicom")},
                               data={"vitals": json.dumps({"age_years": 40 + i}), "site": "site-a"})
                except httpx.HTTPError as exc:
                    with lock:
                        out[name]["errors"].append((time.time(), type(exc).__name__))
                    if killed_at and name == kill:
                        return  # the killed replica's clients stop (a load balancer takes it out)
                    time.sleep(0.05)
                    continue
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        out[name]["ok"].append(r.json()["id"])
                        out[name]["latency"].append(dt)
                    else:
                        out[name]["errors"].append((time.time(), f"{r.status_code} {r.text[:200]}"))

    threads = [threading.Thread(target=worker, args=(name, i), daemon=True)
               for name in servers for i in range(CLIENTS_PER_REPLICA)]
    for t in threads:
        t.start()
    time.sleep(duration / 2)
    servers[kill].kill()
    killed_at.append(time.time())
    time.sleep(duration / 2)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    return out


def test_two_replicas_one_killed_half_way(api_env, tmp_path):  # noqa: F811
    a = Server(api_env, log=tmp_path / "replica-a.log").start()
    b = Server(api_env, log=tmp_path / "replica-b.log").start()
    try:
        res = _run_load({"a": a, "b": b}, api_env.tokens["clinician"], kill="a", duration=DURATION)
        assert res["b"]["errors"] == [], res["b"]["errors"][:5]
        assert len(res["a"]["ok"]) > 0 and len(res["b"]["ok"]) > 0, {k: len(v["ok"]) for k, v in res.items()}
        answered = res["a"]["ok"] + res["b"]["ok"]
        assert len(set(answered)) == len(answered)  # no id handed out twice
        with httpx.Client(base_url=b.url, timeout=60, headers=api_env.headers("clinician")) as c:
            for pid in answered:
                r = c.get(f"/v1/predictions/{pid}")
                assert r.status_code == 200, (pid, r.status_code, r.text[:200])
        with httpx.Client(base_url=b.url, timeout=300, headers=api_env.headers("compliance_officer")) as c:
            v = c.get("/v1/audit/verify")
        assert v.status_code == 200 and v.json()["ok"] is True, v.text[:2000]

        # "once" across replicas: a restarted A and B receive the same prediction's first outcome together
        a2 = Server(api_env, log=tmp_path / "replica-a2.log").start()
        try:
            statuses = []
            for pid in res["b"]["ok"][:6]:
                barrier = threading.Barrier(2)
                got: list[int] = []

                def post(server: Server, truth: str) -> None:
                    with httpx.Client(base_url=server.url, timeout=60, headers=api_env.headers("clinician")) as c:
                        barrier.wait()
                        got.append(c.post(f"/v1/predictions/{pid}/outcome",
                                          json={"confirmed_class": truth}).status_code)

                ts = [threading.Thread(target=post, args=(a2, "covid19")),
                      threading.Thread(target=post, args=(b, "normal"))]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
                statuses.append(sorted(got))
                with httpx.Client(base_url=b.url, timeout=60, headers=api_env.headers("clinician")) as c:
                    stored = c.get(f"/v1/predictions/{pid}").json()["outcome"]
                assert stored is not None and stored["supersedes_id"] is None
            # two different first outcomes: exactly one is stored (201), the other is a 409 conflict
            assert all(s == [201, 409] for s in statuses), statuses
        finally:
            a2.stop()
    finally:
        a.stop()
        b.stop()
    lat = sorted(res["b"]["latency"])
    summary = {"backend": api_env.backend, "duration_s": DURATION, "clients_per_replica": CLIENTS_PER_REPLICA,
               "answered_a_before_kill": len(res["a"]["ok"]), "answered_b": len(res["b"]["ok"]),
               "errors_b": len(res["b"]["errors"]), "errors_a_after_kill": len(res["a"]["errors"]),
               "p50_s_b": statistics.median(lat), "p95_s_b": lat[int(0.95 * (len(lat) - 1))]}
    if os.environ.get("CXR_REPLICA_RESULT"):
        with open(os.environ["CXR_REPLICA_RESULT"], "a") as fh:
            fh.write(json.dumps(summary) + "\n")
