"""API latency benchmark: the real server (uvicorn subprocess on 127.0.0.1), real 2k x 2k DICOMs.

Sends 2048 x 2048 12-bit chest phantoms as DICOM, JPEG 2000 lossless and uncompressed (explicit VR
little endian, 8 MiB), at concurrency 1, 8 and 32; reports p50/p95/p99 latency and throughput per
level and input, and -- in the same run, same machine, same model -- the raw in-process time of
``decode_and_prepare`` (the API's decode path, reduced JPEG 2000 levels included) +
``ClinicalModel.predict`` on the same bytes. The overhead ratio is API p50 at concurrency 1 / raw p50
(goal <= 1.25).

    python benchmarks/api_latency.py [--home DIR] [--requests 12] [--levels 1,8,32] [--out results.json]

With no champion in ``--home`` it bootstraps one: synthetic cohort (40 patients) -> import -> train
(small encoder, 64 px, 1 epoch, CPU) -> signed approval. The model is therefore tiny: the numbers
measure the serving path (upload, decode, storage, audit, auth), which dominates on CPU anyway.
``--encoder densenet121`` bootstraps the clinical default instead (DenseNet-121, 224 px) into an empty
``--home``: the same ratio with a forward pass of clinical size.

``--device cuda`` (a GPU machine; refused with a clear message without CUDA) serves and measures on the
GPU: the API servers run with ``CXR_DEVICE=cuda`` (micro-batching and CUDA-graph replay switch on by
themselves, ``models.batching``), the raw path loads the model on the GPU, and the model part alone is
timed at batch 1, eager and through a captured CUDA graph. Use ``--levels 1,16,64`` there. The raw path
runs the model eagerly, while the API replays graphs: on a GPU the ratio flatters the API by the difference
of the two model-part figures, which are printed next to it.
``--device cpu`` forces the CPU on a GPU machine; without ``--device`` the server picks (``CXR_DEVICE``, else
CUDA when present).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "benchmark-password-2026-cxr"


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _setup_env(home: Path) -> None:
    project = home / "project"
    project.mkdir(parents=True, exist_ok=True)
    os.environ.update({"CXR_HOME": str(home), "CXR_PROJECT_ROOT": str(project), "MLFLOW_DISABLE_TELEMETRY": "true",
                       "DO_NOT_TRACK": "1", "CXR_CHAMPION_POLL_SECONDS": "5"})
    for k in ("MLFLOW_TRACKING_URI", "CXR_DATABASE_URL"):
        os.environ.pop(k, None)
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))


def _ensure_users() -> str:
    from compliance.users import UserError, create_user, issue_token

    for name, role in (("bench-clin", "clinician"), ("bench-res", "researcher"), ("bench-appr", "approver")):
        try:
            create_user(name, role, PASSWORD, actor="benchmark", sites=("bench",) if role == "clinician" else None)
        except UserError:
            pass
    return issue_token("bench-clin", actor="benchmark")


def _ensure_champion(home: Path, encoder: str = "small") -> str:
    from app.services.champion import champion_version

    v = champion_version()
    if v:
        return v
    from compliance.approvals import approve_model_version
    from models.train import train
    from pipelines.ingest import import_dataset
    from pipelines.synth import synthesize_cohort

    size = 64 if encoder == "small" else 224
    print(f"no champion: bootstrapping one (synthetic 40 patients, {encoder} encoder, {size} px, 1 epoch)")
    synthesize_cohort(40, home / "synth", seed=5, image_size=128)
    import_dataset(home / "synth", "benchcohort", seed=5, actor="bench-res", track=False, quiet=True, workers=1)
    res = train("benchcohort", epochs=1, image_size=size, encoder=encoder, batch_size=8, device="cpu", seed=5,
                actor="bench-res", n_bootstrap=20, show_progress=False, num_workers=0)
    approve_model_version(str(res["model_version"]), approver="bench-appr", password=PASSWORD,
                          reason="benchmark champion", override_policy_reason="benchmark-only model (synthetic data)")
    return str(res["model_version"])


def _inputs() -> dict[str, bytes]:
    import numpy as np
    from dicom_factory import make_dicom
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

    from pipelines.synth import _anatomy, render_chest

    rng = np.random.default_rng(42)
    img = render_chest(rng, 2048, 2048, "covid19", 0.6, _anatomy(rng))
    stored = np.clip(img * 4095, 0, 4095).astype(np.uint16)
    return {
        "uncompressed": make_dicom(rows=2048, cols=2048, bits=12, pixels=stored, transfer_syntax=ExplicitVRLittleEndian),
        "jpeg2000": make_dicom(rows=2048, cols=2048, bits=12, pixels=stored, transfer_syntax=JPEG2000Lossless),
    }


VITALS = {"temperature_c": 38.1, "spo2_percent": 93, "heart_rate_bpm": 98, "respiratory_rate": 22,
          "systolic_bp_mmhg": 121, "age_years": 61, "sex": "M"}


def _raw_once(model, data: bytes, vit: dict, max_pixels: int, size: int, reduced: bool = True) -> tuple[float, float]:
    """(decode + prepare + forward, decode + prepare) seconds, in process, on the API's own decode path
    (``decode_and_prepare``: a JPEG 2000 file at its reduced level when ``reduced``, as the API serves it)."""
    from models.preprocessing import decode_and_prepare

    t0 = time.perf_counter()
    _, img = decode_and_prepare(data, size, max_pixels=max_pixels, reduced=reduced)
    t1 = time.perf_counter()
    model.predict([img], [vit])
    return time.perf_counter() - t0, t1 - t0


def _timed_post(client, data: bytes, expect_ok: bool = False):
    """(seconds, response) of one prediction upload: the DICOM as the image part, the benchmark vitals."""
    t0 = time.perf_counter()
    r = client.post("/v1/predictions", files={"image": ("cxr.dcm", data, "application/dicom")},
                    data={"vitals": json.dumps(VITALS), "site": "bench"})
    seconds = time.perf_counter() - t0
    if expect_ok:
        assert r.status_code == 200, r.text[:300]
    return seconds, r


def _retain_freed_memory() -> bool:
    """Make this process's allocator keep freed memory, as a long-running server's already does.

    glibc serves 8-16 MiB buffers (the DICOM bytes, the float32 image) from fresh ``mmap``s until its
    adaptive thresholds have grown; every fresh mapping is page-faulted in on first touch, which adds
    15-25 ms to one raw decode on this machine. The API server reaches that steady state after its first
    requests; the raw measurement must too, or page faults flatter the ratio (measured: raw 0.050-0.057 s
    with glibc's defaults here vs 0.032-0.039 s in steady state, API unchanged). Returns False off glibc.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, 32 * 2**20)) and bool(libc.mallopt(m_trim_threshold, 256 * 2**20))


def _paired_c1(url: str, token: str, model, inputs: dict[str, bytes], n: int,
               others: dict[str, tuple[str, bool, tuple[str, ...]]] | None = None) -> tuple[dict, dict]:
    """Concurrency 1: raw in-process decode+forward and one API request, alternated, so that both see
    the same machine load (the CPUs are shared); returns (raw, api) per input. ``others``: name ->
    (url, authenticated, input kinds or () for all) of further servers timed with the same upload in
    the same rounds, e.g. the transport floor (``_transport_floor_app.py``), the overlap probe or the
    API on another HTTP implementation; their p50 is stored under ``raw[input][name + "_p50_s"]``."""
    import httpx

    from core.config import get_settings
    from models.preprocessing import parse_vitals

    s = get_settings()
    vit = parse_vitals(VITALS, strict=True)
    raw, api = {}, {}
    auth = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, timeout=600, headers=auth) as c:
        for kind, data in inputs.items():
            _raw_once(model, data, vit, s.max_image_pixels, s.cache_image_size, s.reduced_decode)  # warm both paths
            _timed_post(c, data)
            rt, dt, at = [], [], []
            clients = {name: httpx.Client(base_url=u, timeout=600, headers=auth if authed else {})
                       for name, (u, authed, kinds) in (others or {}).items() if not kinds or kind in kinds}
            times: dict[str, list[float]] = {name: [] for name in clients}
            for oc in clients.values():
                _timed_post(oc, data)
            t_start = time.perf_counter()
            for _ in range(n):
                for name, oc in clients.items():
                    time.sleep(0.2)
                    times[name].append(_timed_post(oc, data, expect_ok=True)[0])
                time.sleep(0.2)  # let the server finish its post-response work (audit write) first
                total, dec = _raw_once(model, data, vit, s.max_image_pixels, s.cache_image_size, s.reduced_decode)
                rt.append(total)
                dt.append(dec)
                time.sleep(0.2)
                at.append(_timed_post(c, data, expect_ok=True)[0])
            wall = time.perf_counter() - t_start
            for oc in clients.values():
                oc.close()
            raw[kind] = {"p50_s": statistics.median(rt), "decode_prepare_p50_s": statistics.median(dt),
                         "forward_p50_s": statistics.median(rt) - statistics.median(dt), "n": n}
            for name, ts in times.items():
                raw[kind][f"{name}_p50_s"] = statistics.median(ts)
            api[kind] = {"concurrency": 1, "n": n, "errors": 0, "p50_s": _pct(at, 0.5), "p95_s": _pct(at, 0.95),
                         "p99_s": _pct(at, 0.99), "throughput_per_s": n / sum(at), "wall_s": wall,
                         "note": "alternated with the raw measurement, 0.2 s apart; throughput = 1 / mean latency"}
    return raw, api


def _model_part(model, data: bytes, n: int) -> dict:
    """The model alone at batch 1 (the prepared image in hand, no decode): median seconds over ``n`` calls of
    ``ClinicalModel.predict``, and on CUDA also of ``CudaGraphPredictor.predict`` (one captured graph of
    batch 1; the serving path's replay). CUDA timings synchronise the device before the clock stops."""
    import torch

    from core.config import get_settings
    from models.preprocessing import decode_and_prepare, parse_vitals

    s = get_settings()
    device = str(model.device)
    _, img = decode_and_prepare(data, s.cache_image_size, max_pixels=s.max_image_pixels, reduced=s.reduced_decode)
    vit = parse_vitals(VITALS, strict=True)
    runners = {"eager": model.predict}
    if device == "cuda":
        from models.batching import CudaGraphPredictor

        runners["cuda_graph"] = CudaGraphPredictor(model, (1,)).predict
    out = {"device": device, "n": n, "torch_threads": torch.get_num_threads()}
    for name, predict in runners.items():
        for _ in range(3):
            predict([img], [vit])  # warm-up: kernels chosen, caches filled
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            predict([img], [vit])
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out[f"{name}_p50_s"], out[f"{name}_p95_s"] = statistics.median(times), _pct(times, 0.95)
    return out


def _check_device(device: str | None) -> None:
    """``--device``: refuse CUDA where there is none (rather than measure the CPU under a GPU label), and
    pass the choice to the API servers through ``CXR_DEVICE``."""
    if device is None:
        return
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available on this machine (no GPU, or a CPU-only torch "
                             "build); run without --device, or on a GPU machine")
    os.environ["CXR_DEVICE"] = device


def _check_overlap_probe(data: bytes) -> None:
    """The probe prepares the same array as ``decode_and_prepare`` (float rounding apart), or we stop."""
    import numpy as np
    from _overlap_probe_app import StreamingDicom

    from core.config import get_settings
    from models.preprocessing import decode_and_prepare

    size = get_settings().cache_image_size
    sink = StreamingDicom(size, len(data))
    for i in range(0, len(data), 65536):
        sink.feed(data[i:i + 65536])
    diff = float(np.abs(sink.finish() - decode_and_prepare(data, size)[1]).max())
    print(f"overlap probe: max |probe - decode_and_prepare| = {diff:.2e}")
    if diff > 1e-5:
        raise SystemExit("the overlap probe does not prepare the serving path's array")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(home: Path, argv: list[str], ready: str, cwd: Path = REPO,
           env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """``argv`` as a subprocess on a free 127.0.0.1 port (``{port}`` in ``argv`` is replaced by it; output to
    ``bench-server.log``), returned once ``ready`` answers."""
    import httpx

    port = _free_port()
    argv = [a.replace("{port}", str(port)) for a in argv]
    log = open(home / "bench-server.log", "ab")
    proc = subprocess.Popen(argv, cwd=str(cwd), env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: see {home / 'bench-server.log'}")
        try:
            if httpx.get(url + ready, timeout=2).status_code in (200, 404, 405):
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("server not ready in 180 s")


def _start_server(home: Path, app: str = "app.main:app_factory", ready: str = "/readyz",
                  transport: tuple[str, ...] = (), tree: Path = REPO) -> tuple[subprocess.Popen, str]:
    """A uvicorn subprocess serving ``app`` from the checkout ``tree``; ``transport``: extra uvicorn options
    (``--http h11 --loop asyncio``); none = uvicorn's ``auto``, as ``cxr serve`` runs it (httptools +
    uvloop when installed)."""
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{REPO / 'benchmarks'}")
    return _spawn(home, [sys.executable, "-m", "uvicorn", app, "--factory", "--host", "127.0.0.1", "--port", "{port}",
                         "--no-access-log", "--log-level", "warning", *transport], ready, cwd=tree, env=env)


def _start_wire_floor(home: Path) -> tuple[subprocess.Popen, str]:
    """``_wire_floor_server.py`` in its own process: the least any server can spend receiving the upload."""
    return _spawn(home, [sys.executable, str(REPO / "benchmarks" / "_wire_floor_server.py"), "{port}"], "/")


def _commit(tree: Path) -> str | None:
    out = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or None


def _level(url: str, token: str, data: bytes, concurrency: int, n: int) -> dict:
    import httpx

    lat: list[float] = []
    errors = 0
    lock = threading.Lock()
    local = threading.local()

    def one(_: int) -> None:
        nonlocal errors
        if not hasattr(local, "c"):
            local.c = httpx.Client(base_url=url, timeout=600, headers={"Authorization": f"Bearer {token}"})
        dt, r = _timed_post(local.c, data)
        with lock:
            if r.status_code == 200:
                lat.append(dt)
            else:
                errors += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "n": n, "errors": errors, "p50_s": _pct(lat, 0.5), "p95_s": _pct(lat, 0.95),
            "p99_s": _pct(lat, 0.99), "throughput_per_s": len(lat) / wall, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, default=None, help="CXR_HOME to use (default: a fresh temporary one)")
    ap.add_argument("--requests", type=int, default=12, help="requests per concurrency level and input (>= level)")
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    ap.add_argument("--floor", action="store_true",
                    help="also time the same upload to a FastAPI app that only reads it (the transport floor)")
    ap.add_argument("--wire-floor", action="store_true",
                    help="also time the same upload to a plain blocking socket that only receives it (no HTTP "
                         "framework, no multipart parsing): the least any server on this host can spend on it")
    ap.add_argument("--uvicorn-floor", action="store_true",
                    help="also time the same upload to a bare ASGI app on uvicorn that only receives it (no FastAPI, "
                         "no multipart parsing): the least any application on the project's server can spend on it")
    ap.add_argument("--device", default=None, choices=("cpu", "cuda"),
                    help="serve and measure on this device (default: the server's choice, CUDA when present); "
                         "cuda also times the model part alone at batch 1, eager and by CUDA-graph replay")
    ap.add_argument("--encoder", default="small", choices=("small", "densenet121"),
                    help="encoder of a champion bootstrapped into an empty --home (small: 64 px; densenet121: the "
                         "clinical default, 224 px)")
    ap.add_argument("--compare-tree", type=Path, default=None,
                    help="also time the API served from another checkout (e.g. a worktree of the commit before a "
                         "change), same home and champion, in the same rounds: a side-by-side before/after")
    ap.add_argument("--compare-h11", action="store_true",
                    help="also time the same API on uvicorn's pure-Python h11 + asyncio, in the same rounds (a comparison "
                         "when httptools/uvloop are installed: uvicorn's auto then serves on them)")
    ap.add_argument("--overlap-probe", action="store_true",
                    help="also time _overlap_probe_app.py: decode overlapped with the upload (uncompressed only; "
                         "no auth, storage or audit): what overlap could give")
    ap.add_argument("--steady-allocator", action=argparse.BooleanOptionalAction, default=True,
                    help="measure the raw path with glibc keeping freed memory, as the long-running server's "
                         "allocator does (default; --no-steady-allocator: glibc's defaults, page faults included)")
    args = ap.parse_args()
    home = (args.home or Path(tempfile.mkdtemp(prefix="cxr-bench-"))).resolve()
    _setup_env(home)
    _check_device(args.device)

    token = _ensure_users()
    version = _ensure_champion(home, args.encoder)
    inputs = _inputs()
    sizes = {k: len(v) for k, v in inputs.items()}
    print(f"champion v{version}; inputs: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sizes.items()))

    procs: list[subprocess.Popen] = []
    others: dict[str, tuple[str, bool]] = {}
    try:
        proc, url = _start_server(home)
        procs.append(proc)
        if args.floor:
            p, u = _start_server(home, "_transport_floor_app:build", "/docs")
            procs.append(p)
            others["transport_floor"] = (u, False, ())
        if args.compare_tree:
            p, u = _start_server(home, tree=args.compare_tree.resolve())
            procs.append(p)
            others["api_other_tree"] = (u, True, ())
        if args.wire_floor:
            p, u = _start_wire_floor(home)
            procs.append(p)
            others["wire_floor"] = (u, False, ())
        if args.uvicorn_floor:
            p, u = _start_server(home, "_uvicorn_floor_app:build", "/")
            procs.append(p)
            others["uvicorn_floor"] = (u, False, ())
        if args.compare_h11:
            p, u = _start_server(home, transport=("--http", "h11", "--loop", "asyncio"))
            procs.append(p)
            others["api_h11"] = (u, True, ())
        if args.overlap_probe:
            _check_overlap_probe(inputs["uncompressed"])
            p, u = _start_server(home, "_overlap_probe_app:build", "/docs")
            procs.append(p)
            others["overlap_probe"] = (u, False, ("uncompressed",))
        levels = [int(x) for x in args.levels.split(",")]
        if args.steady_allocator:
            print("raw path measured with the allocator in steady state (mallopt):", _retain_freed_memory())
        from app.services.champion import inference_device
        from models.registry import load_clinical_model

        device = inference_device()  # CXR_DEVICE (set from --device) or what the servers pick by themselves
        model = load_clinical_model(version, device=device)  # the raw path's and the model part's
        raw, c1 = _paired_c1(url, token, model, inputs, max(args.requests, 1), others)
        api: dict[str, list[dict]] = {k: [c1[k]] if 1 in levels else [] for k in inputs}
        for kind, data in inputs.items():
            for c in levels:
                if c != 1:
                    api[kind].append(_level(url, token, data, c, max(args.requests, c)))
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=60)

    model_part = _model_part(model, inputs["uncompressed"], max(args.requests, 20))  # servers stopped

    import importlib.util

    import torch

    server_transport = " + ".join(m for m in ("httptools", "uvloop") if importlib.util.find_spec(m)) or "h11 + asyncio"
    result = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
              "model_version": version, "input_bytes": sizes, "raw": raw, "api": api, "model_part": model_part,
              "api_server_transport": server_transport, "raw_steady_allocator": bool(args.steady_allocator),
              "commit": _commit(REPO), "compare_tree_commit": _commit(args.compare_tree) if args.compare_tree else None}
    print(f"API server transport (uvicorn auto): {server_transport}")
    print(f"\n{'input':<13}{'conc':>5}{'n':>5}{'err':>5}{'p50 s':>9}{'p95 s':>9}{'p99 s':>9}{'req/s':>8}")
    for kind, rows in api.items():
        for r in rows:
            print(f"{kind:<13}{r['concurrency']:>5}{r['n']:>5}{r['errors']:>5}{r['p50_s']:>9.3f}{r['p95_s']:>9.3f}"
                  f"{r['p99_s']:>9.3f}{r['throughput_per_s']:>8.2f}")
    print()
    for kind, r in raw.items():
        ratio = c1[kind]["p50_s"] / r["p50_s"]
        result.setdefault("overhead_ratio_c1", {})[kind] = ratio
        print(f"{kind:<13} raw decode+forward p50 {r['p50_s']:.3f} s (decode+prepare {r['decode_prepare_p50_s']:.3f} s, "
              f"forward {r['forward_p50_s']:.3f} s); API p50 at c=1 {c1[kind]['p50_s']:.3f} s; "
              f"overhead ratio {ratio:.2f} (goal <= 1.25)")
        if "transport_floor_p50_s" in r:
            f = r["transport_floor_p50_s"]
            print(f"{'':<13} transport floor (same upload, a FastAPI app that only reads it) p50 {f:.3f} s; "
                  f"API beyond raw + floor: {c1[kind]['p50_s'] - r['p50_s'] - f:+.3f} s; "
                  f"best possible ratio on this stack {(r['p50_s'] + f) / r['p50_s']:.2f}")
        if "wire_floor_p50_s" in r:
            w = r["wire_floor_p50_s"]
            print(f"{'':<13} wire floor (same upload, a plain blocking socket that only receives it) p50 {w:.3f} s; "
                  f"ratio of raw + wire floor alone, no server work at all: {(r['p50_s'] + w) / r['p50_s']:.2f}")
        if "uvicorn_floor_p50_s" in r:
            v = r["uvicorn_floor_p50_s"]
            print(f"{'':<13} uvicorn floor (same upload, a bare ASGI app on uvicorn that only receives it) p50 {v:.3f} s; "
                  f"ratio of raw + uvicorn floor alone: {(r['p50_s'] + v) / r['p50_s']:.2f}")
        if "overlap_probe_p50_s" in r:
            o = r["overlap_probe_p50_s"]
            own = c1[kind]["p50_s"] - r["p50_s"] - r.get("transport_floor_p50_s", float("nan"))
            print(f"{'':<13} decode overlapped with the upload (probe, no auth/storage/audit) p50 {o:.3f} s "
                  f"(ratio {o / r['p50_s']:.2f}); plus the API's own work ({own:+.3f} s, needs --floor): "
                  f"ratio {(o + max(own, 0.0)) / r['p50_s']:.2f}")
        if "api_other_tree_p50_s" in r:
            o = r["api_other_tree_p50_s"]
            print(f"{'':<13} the API from {args.compare_tree} p50 {o:.3f} s (ratio {o / r['p50_s']:.2f}); "
                  f"this checkout saves {o - c1[kind]['p50_s']:+.3f} s")
        if "api_h11_p50_s" in r:
            h = r["api_h11_p50_s"]
            print(f"{'':<13} the same API on h11 + asyncio p50 {h:.3f} s (ratio {h / r['p50_s']:.2f}); "
                  f"{server_transport} saves {h - c1[kind]['p50_s']:+.3f} s")
    graph = (f"; CUDA-graph replay p50 {model_part['cuda_graph_p50_s'] * 1000:.2f} ms (goal <= 2.5 ms)"
             if "cuda_graph_p50_s" in model_part else "")
    print(f"\nmodel part alone, batch 1 on {device} (n = {model_part['n']}): eager p50 "
          f"{model_part['eager_p50_s'] * 1000:.2f} ms, p95 {model_part['eager_p95_s'] * 1000:.2f} ms{graph}")
    result["api_c1_alternated"] = True
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
