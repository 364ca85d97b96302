"""Decode-speed benchmark (issue #18): full vs reduced-resolution decoding, and the API before/after.

Part 1, in process: for each encoding (JPEG 2000 lossless / lossy, and uncompressed + RLE for
reference) and size (2048², 2560 x 2048, 3000²; 12-bit chest phantoms with a VOI window, as DX For
Presentation images carry, and for JPEG 2000 also without one), the time of ``decode_dicom`` + ``prepare_image`` to the 256² model input:
"full" = ``decode_and_prepare(..., reduced=False)`` (today's path, the naive full decode + resize),
"reduced" = ``decode_and_prepare(...)``; full and reduced alternate, best-of and median reported,
plus the reduction level and the PSNR of reduced vs full.

Part 2, the real API: two uvicorn servers on 127.0.0.1 (``benchmarks/api_latency.py`` start-up and
champion bootstrap), one with ``CXR_REDUCED_DECODE=0`` ("before": full decode forced), one with
``CXR_REDUCED_DECODE=1`` ("after"); requests for a 2048² JPEG 2000 lossless upload go to the two
servers alternately (concurrency 1: one after the other; concurrency 8: rounds of 8 parallel
requests, alternating servers per round); p50/p95 per server and level. Target: the whole "after"
request at concurrency 1 is ≥ 3x faster than the naive full decode + resize alone (part 1's "full"
for the same file, measured in this run).

    python benchmarks/decode_speed.py [--quick] [--repeat 7] [--requests 16] [--home DIR] [--no-api] [--out FILE]

``--quick``: a smoke run (512² images, 2 repeats, 2 requests per level, concurrency 1 and 2).
Prints markdown tables (paste into benchmarks/RESULTS.md). Run it on an idle machine for numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

ENCODINGS = ("JPEG2000Lossless", "JPEG2000", "ExplicitVRLittleEndian", "RLELossless")


def _phantom(rows: int, cols: int, seed: int = 42) -> np.ndarray:
    from pipelines.synth import _anatomy, render_chest

    rng = np.random.default_rng(seed)
    return render_chest(rng, rows, cols, "covid19", 0.6, _anatomy(rng))


def make_file(img: np.ndarray, encoding: str, bits: int = 12, window: bool = True) -> bytes:
    """A DICOM of the phantom (values 5–95 % of the range) with a 0.5–99.5 percentile window, or
    (``window=False``) with none: min–max scaling, and a burned-in full-white marker as CR films carry."""
    import pydicom.uid as U
    from dicom_factory import make_dicom

    maxv = 2**bits - 1
    stored = np.round((0.05 + 0.9 * img) * maxv).astype(np.uint16)
    lo, hi = np.percentile(stored, [0.5, 99.5])
    if not window:
        stored[100:160, 100:140] = maxv
    return make_dicom(rows=img.shape[0], cols=img.shape[1], bits=bits, pixels=stored,
                      transfer_syntax=getattr(U, encoding), window=((lo + hi) / 2, hi - lo) if window else None)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def decode_table(sizes: list[tuple[int, int]], repeat: int, size: int = 256) -> list[dict]:
    from models.preprocessing import decode_and_prepare

    rows = []
    for shape in sizes:
        img = _phantom(*shape)
        for enc, window in [(e, w) for e in ENCODINGS for w in ((True, False) if "JPEG2000" in e else (True,))]:
            data = make_file(img, enc, window=window)
            decode_and_prepare(data, size, reduced=False)  # warm-up (imports, plugin discovery)
            full_t, red_t = [], []
            for _ in range(repeat):  # alternate: both see the same machine load
                t0 = time.perf_counter()
                _, full = decode_and_prepare(data, size, reduced=False)
                full_t.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                decoded, red = decode_and_prepare(data, size)
                red_t.append(time.perf_counter() - t0)
            rows.append({"encoding": enc if window else f"{enc} (no window)", "shape": shape, "bytes": len(data), "reduction": decoded.reduction,
                         "decoded_shape": decoded.shape, "full_median_s": statistics.median(full_t),
                         "full_best_s": min(full_t), "reduced_median_s": statistics.median(red_t),
                         "reduced_best_s": min(red_t), "psnr_db": _psnr(red, full)})
            print(f"  {rows[-1]['encoding']:<36} {shape[0]}x{shape[1]}: full {statistics.median(full_t):.3f} s, "
                  f"reduced {statistics.median(red_t):.3f} s (k={decoded.reduction})", flush=True)
    return rows


def _route_wired() -> bool:
    """Does the prediction route pass a target size to the decoder (the reduced path reachable)?"""
    text = (REPO / "app" / "services" / "predictions.py").read_text()
    return "target_size" in text or "decode_and_prepare" in text or "prepare_image(decoded," in text


def api_table(home: Path, data: bytes, requests: int, levels: list[int]) -> dict:
    import api_latency as al
    import httpx

    token = al._ensure_users()
    version = al._ensure_champion(home)
    servers = {}
    try:
        for mode, flag in (("before (CXR_REDUCED_DECODE=0)", "0"), ("after (CXR_REDUCED_DECODE=1)", "1")):
            os.environ["CXR_REDUCED_DECODE"] = flag
            servers[mode] = al._start_server(home)
        os.environ.pop("CXR_REDUCED_DECODE", None)
        clients = {m: httpx.Client(base_url=u, timeout=600, headers={"Authorization": f"Bearer {token}"})
                   for m, (_, u) in servers.items()}

        def post(mode: str) -> float:
            t0 = time.perf_counter()
            r = clients[mode].post("/v1/predictions", files={"image": ("cxr.dcm", data, "application/dicom")},
                                   data={"vitals": json.dumps(al.VITALS), "site": "bench"})
            dt = time.perf_counter() - t0
            if r.status_code != 200:
                raise SystemExit(f"{mode}: HTTP {r.status_code}: {r.text[:300]}")
            return dt

        for mode in servers:  # warm-up: model load, first decode
            post(mode)
        result: dict = {"model_version": version, "levels": {}}
        for c in levels:
            lat: dict[str, list[float]] = {m: [] for m in servers}
            rounds = max(1, requests // c)
            with ThreadPoolExecutor(max_workers=c) as pool:
                for _ in range(rounds):
                    for mode in servers:  # alternate servers round by round
                        time.sleep(0.2)  # let the previous requests' post-response work finish
                        lat[mode].extend(pool.map(lambda _i, m=mode: post(m), range(c)))
            result["levels"][c] = {m: {"n": len(v), "p50_s": al._pct(v, 0.5), "p95_s": al._pct(v, 0.95)}
                                   for m, v in lat.items()}
            print(f"  concurrency {c}: " + "; ".join(f"{m} p50 {al._pct(v, 0.5):.3f} s" for m, v in lat.items()),
                  flush=True)
        for c in clients.values():
            c.close()
        return result
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (512² images, 2 repeats, 2 requests)")
    ap.add_argument("--repeat", type=int, default=7, help="decodes per file and path (alternated)")
    ap.add_argument("--requests", type=int, default=16, help="API requests per server and concurrency level")
    ap.add_argument("--levels", default="1,8", help="API concurrency levels")
    ap.add_argument("--home", type=Path, default=None, help="CXR_HOME for the API part (default: a fresh temp one)")
    ap.add_argument("--no-api", action="store_true", help="decode table only")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = ap.parse_args()
    if args.quick:
        sizes, repeat, requests, levels, api_shape = [(512, 512)], 2, 2, [1, 2], (512, 512)
    else:
        sizes, repeat, requests = [(2048, 2048), (2560, 2048), (3000, 3000)], args.repeat, args.requests
        levels, api_shape = [int(x) for x in args.levels.split(",")], (2048, 2048)

    home = None
    if not args.no_api:  # isolate all state (CXR_HOME, project root) before anything reads the settings
        import api_latency as al

        from core.config import reset_settings

        home = (args.home or Path(tempfile.mkdtemp(prefix="cxr-decode-bench-"))).resolve()
        al._setup_env(home)
        reset_settings()

    import torch

    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch_threads": torch.get_num_threads()}
    print(f"machine: {machine}\ndecode + prepare to 256² (median of {repeat}, alternated):", flush=True)
    dec = decode_table(sizes, repeat)
    result: dict = {"machine": machine, "decode": dec}

    print("\n### Decode + prepare (256²), full vs reduced\n")
    print("| encoding | size | MiB | full median s | reduced median s | speed-up | level k (decoded) | PSNR dB |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    for r in dec:
        k = f"{r['reduction']} ({r['decoded_shape'][0]}x{r['decoded_shape'][1]})" if r["reduction"] else "0 (full)"
        print(f"| {r['encoding']} | {r['shape'][0]}x{r['shape'][1]} | {r['bytes'] / 2**20:.1f} | {r['full_median_s']:.3f} "
              f"| {r['reduced_median_s']:.3f} | {r['full_median_s'] / r['reduced_median_s']:.1f}x | {k} | "
              f"{r['psnr_db']:.1f} |")

    if not args.no_api:
        wired = _route_wired()
        print(f"\nAPI (2 servers, alternated), {api_shape[0]}x{api_shape[1]} JPEG 2000 lossless:", flush=True)
        if not wired:
            print("WARNING: app/services/predictions.py does not pass target_size to decode_dicom: the 'after' server "
                  "still decodes at full resolution (wiring: models/preprocessing.py docstring, issue #18).")
        data = make_file(_phantom(*api_shape), "JPEG2000Lossless")
        api = api_table(home, data, requests, levels)
        api["route_wired"] = wired
        result["api"] = api
        naive = next(r["full_median_s"] for r in dec if r["encoding"] == "JPEG2000Lossless" and r["shape"] == api_shape)
        print(f"\n### API request, {api_shape[0]}x{api_shape[1]} JPEG 2000 lossless (model v{api['model_version']})\n")
        print("| concurrency | server | n | p50 s | p95 s |")
        print("|---:|---|---:|---:|---:|")
        for c, per in api["levels"].items():
            for mode, r in per.items():
                print(f"| {c} | {mode} | {r['n']} | {r['p50_s']:.3f} | {r['p95_s']:.3f} |")
        after = api["levels"][levels[0]]["after (CXR_REDUCED_DECODE=1)"]["p50_s"]
        ratio = naive / after
        result["target"] = {"naive_full_decode_resize_s": naive, "api_after_p50_c1_s": after, "ratio": ratio}
        print(f"\nnaive full decode + resize alone: {naive:.3f} s; whole API request after (c={levels[0]}, p50): "
              f"{after:.3f} s; ratio {ratio:.1f}x (target ≥ 3x){'' if wired else ' -- route not wired'}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
