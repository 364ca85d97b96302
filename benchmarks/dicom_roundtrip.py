"""DICOM round-trip benchmark: association release -> the SR stored in the PACS.

Real parts: Orthanc (Debian package) as the PACS on loopback, ``cxr dicom listen`` in a subprocess
serving the registry's champion, a pynetdicom SCU as the modality. Each sample is one study with
one frontal chest CR (12-bit, ``--size`` px square, explicit VR little endian): the sender opens an
association to the listener, C-STOREs the image, releases; the clock starts when the release
completes and stops when Orthanc's REST API first lists the study's SR (polled every 20 ms, so
the resolution is ~20 ms). ``--senders 1,4``: 1 and 4 parallel senders (one association each at a
time), ``--samples`` studies per level; p50/p95/mean/max per level.

    python benchmarks/dicom_roundtrip.py [--home DIR] [--size 1024] [--samples 40] [--senders 1,4] [--out FILE]
    python benchmarks/dicom_roundtrip.py --quick        # smoke run: 256 px, 4 samples per level

With no champion in ``--home`` it bootstraps the same tiny model as benchmarks/api_latency.py
(synthetic 40 patients, small encoder, 64 px, 1 epoch, signed approval): the numbers measure the
DICOM path (receive, spool + fsync, decode, model, Grad-CAM, SR/SC build, C-STORE, PACS indexing).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
LISTENER_AET = "CXR-AI"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def _start_listener(home: Path, destination: str, port: int, log: Path) -> subprocess.Popen:
    from pacs_fixtures import echoscu

    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "dicom", "listen", "--host", "127.0.0.1", "--port",
                             str(port), "--ae-title", LISTENER_AET, "--send-to", destination, "--spool",
                             str(home / "bench-spool"), "--log-level", "WARNING"],
                            cwd=str(REPO), env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"listener exited ({proc.returncode}): {log.read_text()[-2000:]}")
        if echoscu("127.0.0.1", port, LISTENER_AET).returncode == 0:
            return proc
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("listener did not answer C-ECHO in 300 s")


def _one(orthanc, port: int, workdir: Path, index: int, size: int, timeout: float) -> float:
    import pydicom
    from pacs_fixtures import chest_file
    from pydicom.uid import generate_uid
    from pynetdicom import AE

    study = generate_uid()
    src = chest_file(workdir / f"b{index}.dcm", study_uid=study, index=index, size=size)
    ds = pydicom.dcmread(src["path"])
    ae = AE(ae_title="BENCH-SCU")
    ae.add_requested_context(ds.SOPClassUID, [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title=LISTENER_AET)
    if not assoc.is_established:
        raise RuntimeError("association to the listener not established")
    status = assoc.send_c_store(ds)
    if getattr(status, "Status", None) != 0x0000:
        raise RuntimeError(f"C-STORE to the listener failed: {status}")
    assoc.release()
    t0 = time.perf_counter()
    deadline = t0 + timeout
    while time.perf_counter() < deadline:
        ids = orthanc.find_instances(StudyInstanceUID=study, SOPClassUID=SR_CLASS)
        if ids:
            return time.perf_counter() - t0
        time.sleep(0.02)
    raise RuntimeError(f"no SR in the PACS {timeout:.0f} s after release")


def run_level(orthanc, port: int, workdir: Path, senders: int, samples: int, size: int, start: int) -> list[float]:
    times: list[float] = []
    errors: list[str] = []
    counter = iter(range(start, start + samples))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            try:
                dt = _one(orthanc, port, workdir, i, size, timeout=300)
                with lock:
                    times.append(dt)
            except Exception as exc:  # noqa: BLE001
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker) for _ in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} sample(s) failed: {errors[:3]}")
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, default=None, help="CXR_HOME with a champion (default: a fresh temp dir)")
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels")
    ap.add_argument("--samples", type=int, default=40, help="studies per level")
    ap.add_argument("--senders", default="1,4", help="parallel senders per level, comma-separated")
    ap.add_argument("--quick", action="store_true", help="smoke run: 256 px, 4 samples per level")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.size, args.samples = 256, 4
    home = args.home or Path(tempfile.mkdtemp(prefix="cxr-dicom-bench-"))

    from api_latency import _ensure_champion, _ensure_users, _pct, _setup_env

    _setup_env(home)
    from pacs_fixtures import Orthanc, ensure_tools, free_port

    missing = ensure_tools()
    if missing:
        sys.exit(f"missing tools (install orthanc, dcmtk, dicom3tools): {missing}")
    _ensure_users()
    version = _ensure_champion(home)
    work = home / "bench-work"
    work.mkdir(exist_ok=True)
    orthanc = Orthanc(work / "orthanc").start()
    port = free_port()
    listener = _start_listener(home, orthanc.destination, port, work / "listener.log")
    result: dict = {"benchmark": "dicom_roundtrip", "model_version": version, "image_px": args.size,
                    "samples_per_level": args.samples, "machine": {"cpus": os.cpu_count(),
                                                                   "platform": platform.platform()},
                    "quick": args.quick, "levels": {}}
    try:
        _one(orthanc, port, work, 0, args.size, timeout=300)  # warm-up (first Grad-CAM, first association)
        start = 1
        for senders in [int(s) for s in args.senders.split(",") if s.strip()]:
            t = time.perf_counter()
            times = run_level(orthanc, port, work, senders, args.samples, args.size, start)
            wall = time.perf_counter() - t
            start += args.samples
            result["levels"][str(senders)] = {
                "senders": senders, "n": len(times), "p50_s": round(_pct(times, 0.5), 3),
                "p95_s": round(_pct(times, 0.95), 3), "mean_s": round(sum(times) / len(times), 3),
                "max_s": round(max(times), 3), "studies_per_s": round(len(times) / wall, 2)}
            lv = result["levels"][str(senders)]
            print(f"senders={senders}: n={lv['n']} release->SR p50 {lv['p50_s']:.3f} s, p95 {lv['p95_s']:.3f} s, "
                  f"max {lv['max_s']:.3f} s, {lv['studies_per_s']} studies/s", flush=True)
    finally:
        listener.terminate()
        try:
            listener.wait(timeout=30)
        except subprocess.TimeoutExpired:
            listener.kill()
        orthanc.stop()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
