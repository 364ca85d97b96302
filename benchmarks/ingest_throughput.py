"""DICOM ingest throughput on this machine: files/s of a full import vs decode-only.

    .venv/bin/python benchmarks/ingest_throughput.py [--files 100] [--sizes 512 2048] [--workers 1 2] [--write-results]

Synthesises DICOM cohorts (``cxr data synth`` when available, plus plain 12-bit uncompressed CR
files written with pydicom at each --sizes), then for each, in the same run, measures:
- decode-only: ``decode_dicom`` over every file, one process;
- full import: ``import_dataset`` (decode + validate + de-identify + hash + prepare_image + dedupe
  + split + write manifest/arrays; no DVC) with each worker count asked for.
Everything runs in a temporary project root / CXR_HOME, never in the repository's data/.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _write_plain_cohort(out: Path, n: int, size: int) -> str:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = ["covid19", "other_pneumonia", "normal"]
    rows = []
    yy, xx = np.mgrid[0:size, 0:size]
    base = 1800 + 700 * np.sin(xx / 37) * np.cos(yy / 53)
    for i in range(n):
        img = np.clip(base + rng.normal(0, 80, (size, size)), 0, 4095).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.PatientID, ds.PatientName, ds.StudyDate = f"BENCH-{i // 2}", f"Bench^{i // 2}", "20210101"
        ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = img.tobytes()
        fn = f"img_{i:05d}.dcm"
        ds.save_as(out / fn, enforce_file_format=True)
        rows.append({"filename": fn, "patient_id": f"BENCH-{i // 2}", "label": labels[i % 3], "site": "bench",
                     "study_date": "2021-01-01", "view": "PA", "sex": "F", "age_years": "50"})
    with open(out / "vitals.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return f"pydicom-written uncompressed 12-bit CR, {size}x{size}"


def _synth_cli(out: Path, n: int) -> str | None:
    """A cohort from `cxr data synth` (mixed encodings) when that command exists, else None."""
    cxr = Path(sys.executable).parent / "cxr"
    if not cxr.exists():
        return None
    patients = max(1, n // 2)
    proc = subprocess.run([str(cxr), "data", "synth", "--patients", str(patients), "--out", str(out),
                           "--seed", "0"], capture_output=True, text=True)
    if proc.returncode != 0 or not (out / "vitals.csv").exists():
        shutil.rmtree(out, ignore_errors=True)
        return None
    files = [p for p in out.rglob("*") if p.is_file() and p.name != "vitals.csv"]
    return f"`cxr data synth --patients {patients}` ({len(files)} files, mixed encodings)"


def _measure(src: Path, tmp: Path, how: str, workers: list[int], tag: str, repeat: int = 2) -> dict:
    """Decode-only and full import on the same files, interleaved ``repeat`` times; best of each."""
    from models.preprocessing import decode_dicom
    from pipelines.ingest import import_dataset

    files = sorted(p for p in src.rglob("*") if p.is_file() and p.name != "vitals.csv")
    n = len(files)
    # warm-up: one import of the whole cohort (module imports, codec plugins, audit database,
    # page cache) before anything is timed, so neither measurement pays one-off costs
    import_dataset(src, f"warm-{tag}", seed=0, actor="benchmark", track=False, workers=1, quiet=True)
    decode_s = float("inf")
    import_s = {w: float("inf") for w in workers}
    accepted = rejected = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        for p in files:
            decode_dicom(p.read_bytes())
        decode_s = min(decode_s, time.perf_counter() - t0)
        for w in workers:
            t0 = time.perf_counter()
            s = import_dataset(src, f"bench-{tag}-w{w}", seed=0, actor="benchmark", track=False, workers=w,
                               quiet=True, force=True)
            import_s[w] = min(import_s[w], time.perf_counter() - t0)
            accepted, rejected = s.n_accepted, s.n_rejected
    decode_fps = n / decode_s
    out = {"cohort": how, "files": n, "decode_only_files_per_s": round(decode_fps, 1), "import": {}}
    for w in workers:
        out["import"][w] = {"seconds": round(import_s[w], 2), "files_per_s": round(n / import_s[w], 1),
                            "ratio_vs_decode_only": round((n / import_s[w]) / decode_fps, 2),
                            "accepted": accepted, "rejected": rejected}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=100)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 2048],
                    help="sides of the plain pydicom-written cohorts (a typical CR is 2000-3000 px)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement; the best is kept")
    ap.add_argument("--no-synth", action="store_true", help="skip the `cxr data synth` cohort")
    ap.add_argument("--write-results", action="store_true", help="append a section to benchmarks/RESULTS.md")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="cxr-ingest-bench-"))
    os.environ["CXR_HOME"] = str(tmp / "home")
    os.environ["CXR_PROJECT_ROOT"] = str(tmp / "project")
    (tmp / "project").mkdir()
    from core.config import reset_settings

    reset_settings()
    runs = []
    try:
        if not args.no_synth:
            how = _synth_cli(tmp / "synth", args.files)
            if how:
                runs.append(_measure(tmp / "synth", tmp, how, args.workers, "synth", args.repeat))
        for size in args.sizes:
            src = tmp / f"plain{size}"
            how = _write_plain_cohort(src, args.files, size)
            runs.append(_measure(src, tmp, how, args.workers, f"p{size}", args.repeat))
        print(json.dumps(runs, indent=2))
        if args.write_results:
            _write_results(runs, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_results(runs: list[dict], args) -> None:
    path = REPO / "benchmarks" / "RESULTS.md"
    if not path.exists():
        path.write_text("# Benchmark results\n\nEach section: what was measured, on which machine, when, "
                        "with which command. Add your own section; leave the others as they are.\n")
    lines = [
        "",
        "## DICOM ingest throughput (`cxr data import`, pipelines/ingest.py)",
        "",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {os.cpu_count()}-core {platform.machine()}, no GPU, shared with other jobs "
        f"(load average at start {os.getloadavg()[0]:.1f}); Python {platform.python_version()}",
        f"- command: `.venv/bin/python benchmarks/ingest_throughput.py --files {args.files} "
        f"--sizes {' '.join(map(str, args.sizes))} --workers {' '.join(map(str, args.workers))} --repeat {args.repeat}"
        f"{' --no-synth' if args.no_synth else ''} --write-results`",
        "- full import = decode + validate + de-identify + sha256 content hash + `prepare_image` (256²) + "
        "dedupe + patient split + manifest/arrays written (DVC add/push not included); decode-only = "
        "`decode_dicom` over the same files in one process, measured in the same run, interleaved with the imports after a warm-up import; best of `--repeat` runs each",
        "- caveat: the 2 cores are shared with other sessions' jobs (see the load average), so runs vary; "
        "`cxr data import` uses 2 decode processes by default (`--workers` / `CXR_INGEST_WORKERS`)",
        "",
        "| cohort | files | decode-only files/s | workers | import s | import files/s | import ÷ decode-only |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        for w, m in r["import"].items():
            lines.append(f"| {r['cohort']} | {r['files']} | {r['decode_only_files_per_s']} | {w} | {m['seconds']} | "
                         f"{m['files_per_s']} | {m['ratio_vs_decode_only']} |")
    lines.append("")
    # replace this benchmark's own section (a re-run), leave every other section as it is
    text = path.read_text()
    head = lines[1]
    if head in text:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        text = text[:start].rstrip("\n") + "\n" + (text[nxt:] if nxt >= 0 else "")
    path.write_text(text.rstrip("\n") + "\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
