"""Dataset import: decode → validate → de-identify → dedupe → label → split by patient → cache.

Two source layouts:

(a) a folder of DICOM files, optionally with an index ``vitals.csv`` (the synthetic layout of
    ``cxr data synth``: filename, patient_id, label, site, study_date, view, sex, age_years, the
    vitals, variant) or a ``labels.csv`` sidecar (filename, label, ...). Without an index every
    file is a record, labelled ``unlabeled``; with one, every index row is a record; files a
    vitals.csv does not list are rejected (``not-in-index``), files a labels.csv does not list
    are imported as ``unlabeled``. Index labels must be class names (else ``unknown-label``).
(b) the public COVID-19 image data collection (``metadata.csv`` + ``images/``, PNG/JPEG).

Output, under ``data/<name>/`` (then ``dvc add`` + ``dvc push``):
- ``manifest.parquet``: one row per accepted image (columns in docs/INTERFACES.md + extras);
- ``rejected.csv``: one row per rejected input record: de-identified source fields, ``code``,
  ``reason`` and, for duplicate images, the twin (``duplicate_of_row``/``duplicate_of_patient``);
- ``arrays/<image_hash>.npy``: float16 (1, 256, 256) from ``prepare_image``.
Every input record ends in exactly one of manifest / rejected.

De-identification (DICOM PS3.15 Basic Application Level Confidentiality Profile, with the Retain
Patient Characteristics option for sex/age and site kept as an operational label): nothing from
the source that identifies a person is written. Source patient ids become ``p-<16 hex>`` =
HMAC-SHA256(pseudonym_key, namespace|id); dates are shifted per patient by 1..365 days (derived
from the same keyed hash, so a patient's dates keep their intervals); kept UIDs are remapped to
``2.25.<int>`` by keyed hash (consistent across files); names, accession numbers, free-text notes,
URLs/DOIs and source file names are dropped; ages over 89 are reported as 90 (HIPAA Safe Harbor
aggregation). Source rows are referenced by their row number only (``source_row``).
"""
from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import os
import re
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from core.config import get_settings
from core.identity import acting_user
from core.lineage import git_commit

PUBLIC_SOURCE = "covid-chestxray-dataset"
DICOM_SOURCE = "dicom"
INDEX_NAMES = ("vitals.csv", "labels.csv")
LABELS = ("covid19", "other_pneumonia", "normal", "unlabeled")
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
VITAL_COLUMNS = ("temperature_c", "spo2_percent", "heart_rate_bpm", "respiratory_rate",
                 "systolic_bp_mmhg", "age_years")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MAX_REPORTED_AGE = 90  # ages > 89 aggregated (HIPAA Safe Harbor)
MANIFEST_COLUMNS = [
    "image_hash", "patient_id", "split_group", "split", "label", "finding", "view", "site", "source",
    "variant", "batch", "sex", *VITAL_COLUMNS, "study_date", "study_year", "days_since_onset",
    "modality", "photometric", "transfer_syntax", "orig_height", "orig_width", "study_uid", "sop_uid",
    "source_row", "warnings", "array_path",
    # issue 13: where the label came from, the image's origin (publisher) and its perceptual hash
    "label_source", "origin", "phash",
]
REJECTED_COLUMNS = [
    "batch", "source_row", "code", "reason", "duplicate_of_row", "duplicate_of_patient", "patient_id",
    "label", "finding", "view", "modality", "site", "sex", "age_years", "temperature_c", "spo2_percent",
    "heart_rate_bpm", "respiratory_rate", "systolic_bp_mmhg", "study_date", "variant",
]


class DatasetImportError(RuntimeError):
    """The import cannot run at all (bad source, name taken, ...): message for the user."""


@dataclass
class ImportSummary:
    name: str
    source_kind: str
    batch: int
    n_input: int
    n_accepted: int
    n_rejected: int
    by_label: dict = field(default_factory=dict)
    by_split: dict = field(default_factory=dict)
    by_site: dict = field(default_factory=dict)
    by_view: dict = field(default_factory=dict)
    by_code: dict = field(default_factory=dict)
    n_patients: int = 0
    near_duplicate_pairs: list = field(default_factory=list)  # [{row_a, row_b, patient_a, patient_b, distance, ...}]
    near_duplicate_distance: int | None = None  # pHash bits up to which pairs were linked (choose_link_distance)
    confounding: dict = field(default_factory=dict)  # site/source ↔ label (models.confounding)
    dvc_md5: str | None = None
    root: Path | None = None
    seconds: float = 0.0
    workers: int = 1

    @property
    def files_per_s(self) -> float:
        return self.n_input / self.seconds if self.seconds else 0.0

    def counts(self) -> dict:
        """Counts only (no PHI): what the audit trail records."""
        d = asdict(self)
        d.pop("root")
        d["n_near_duplicate_pairs"] = len(self.near_duplicate_pairs)
        d.pop("near_duplicate_pairs")
        d["files_per_s"] = round(self.files_per_s, 2)
        d["seconds"] = round(self.seconds, 2)
        return d


# --------------------------------------------------------------------------------------------
# keyed pseudonyms, date shift, UID remap


class Pseudonymizer:
    def __init__(self, key: str):
        self._key = key.encode()

    def _mac(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def patient(self, namespace: str, source_id: str) -> str:
        return "p-" + self._mac(f"patient|{namespace}|{source_id}")[:16]

    def date_shift_days(self, pseudonym: str) -> int:
        return 1 + int(self._mac(f"dateshift|{pseudonym}")[:8], 16) % 365

    def uid(self, uid: str) -> str:
        return "2.25." + str(int(self._mac(f"uid|{uid}")[:32], 16))

    @property
    def key_id(self) -> str:
        """Which key was used (a one-way fingerprint, not the key)."""
        return hashlib.sha256(b"key-id|" + self._key).hexdigest()[:12]


_DATE_FORMATS = ("%Y-%m-%d", "%Y%m%d", "%B %d, %Y", "%b %d, %Y", "%d %B %Y", "%m/%d/%Y", "%m/%d/%y")


def parse_date(text: Any) -> tuple[date | None, int | None]:
    """(full date, year) from the free-text dates sources use; (None, year) for year/month only."""
    if text is None:
        return None, None
    s = str(text).strip()
    if not s or s.lower() == "nan":
        return None, None
    for fmt in _DATE_FORMATS:
        try:
            d = datetime.strptime(s, fmt).date()
            return d, d.year
        except ValueError:
            continue
    m = re.search(r"\b(19|20)\d\d\b", s)
    return None, (int(m.group(0)) if m else None)


# --------------------------------------------------------------------------------------------
# labels


def map_finding(finding: Any, free_text: bool = True) -> str | None:
    """Finding → label, or None when rejected: see ``pipelines.labels.classify_finding`` (negation- and
    synonym-aware; ambiguous strings are rejected with code ``ambiguous-label``, never guessed)."""
    from pipelines.labels import map_finding as _map

    return _map(finding, free_text)


# --------------------------------------------------------------------------------------------
# records


@dataclass
class Record:
    row: int  # 1-based row of the index / listing
    path: Path | None
    kind: str  # "dicom" | "image"
    source: str
    raw: dict  # source fields (may hold PHI; memory only)
    code: str | None = None  # rejection decided before decoding
    reason: str | None = None


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip().lower() in ("", "nan", "none")


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        return [dict(r) for r in csv.DictReader(fh)]


def _confined(base: Path, name: str) -> tuple[Path | None, str | None]:
    """``base / name`` when it stays inside ``base``; else (None, reason). An index file is input:
    an absolute name, a ``..`` component, a drive or a link that resolves outside the source folder
    would make the import read (and cache, and version) files the operator never chose."""
    from pathlib import PurePosixPath, PureWindowsPath

    text = name.replace("\\", "/")
    if (PurePosixPath(text).is_absolute() or PureWindowsPath(name).drive or PureWindowsPath(name).is_absolute()
            or name.startswith(("/", "\\", "~"))):
        return None, "the file name is an absolute path; index files name images relative to the source folder"
    if ".." in PurePosixPath(text).parts:
        return None, "the file name contains '..'; index files may not name files outside the source folder"
    path = base / text
    try:
        root = base.resolve()
        if path.exists() and root not in path.resolve().parents:
            return None, "the file name resolves (through a link) outside the source folder"
    except (OSError, RuntimeError):
        return None, "the file name cannot be resolved inside the source folder"
    return path, None


def detect_layout(source: Path) -> str:
    if (source / "metadata.csv").is_file() and (source / "images").is_dir():
        return "public"
    return "dicom"


def _public_records(source: Path) -> list[Record]:
    records = []
    for i, r in enumerate(_read_csv(source / "metadata.csv"), start=1):
        fn = (r.get("filename") or "").strip()
        path, outside = _confined(source / "images", fn) if fn else (None, None)
        rec = Record(row=i, path=path, kind="image", source=PUBLIC_SOURCE, raw={
            "patient_key": (r.get("patientid") or "").strip(),
            "finding": (r.get("finding") or "").strip(),
            "view": (r.get("view") or "").strip(),
            "modality": (r.get("modality") or "").strip(),
            "site": (r.get("location") or "").strip(),
            "date": r.get("date"),
            "offset": r.get("offset"),
            "sex": r.get("sex"),
            "age_years": r.get("age"),
            "temperature_c": r.get("temperature"),
            "spo2_percent": r.get("pO2_saturation"),
            # provenance + label source only (memory; never written: URLs/DOIs/notes are dropped)
            "url": (r.get("url") or "").strip(), "doi": (r.get("doi") or "").strip(),
            "notes": " ".join((r.get(k) or "") for k in ("clinical_notes", "other_notes")),
        })
        if not fn:
            rec.code, rec.reason = "missing-file", "the row names no image file (column `filename` is empty)"
        elif outside:
            rec.code, rec.reason = "path-outside-source", outside
        elif not path.is_file():
            rec.code, rec.reason = "missing-file", "the image file the row names is not in images/"
        elif rec.raw["modality"] and rec.raw["modality"].lower() not in ("x-ray", "xray", "cr", "dx"):
            rec.code = "wrong-modality"
            rec.reason = f"modality is {rec.raw['modality']!r}; expected a chest radiograph (X-ray)"
        records.append(rec)
    return records


def _dicom_records(source: Path) -> list[Record]:
    index_path = next((source / n for n in INDEX_NAMES if (source / n).is_file()), None)
    index_files = {source / n for n in INDEX_NAMES}
    root = source.resolve()
    files = sorted(
        p for p in source.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(source).parts)
        and p not in index_files and p.name.lower() not in ("readme.md", "readme.txt")
        and root in p.resolve().parents  # a link out of the source folder is not imported
    )
    records: list[Record] = []
    if index_path is None:
        for i, p in enumerate(files, start=1):
            records.append(Record(row=i, path=p, kind="dicom", source=DICOM_SOURCE, raw={}))
        return records
    rows = _read_csv(index_path)
    if rows and "filename" not in rows[0]:
        raise DatasetImportError(f"{index_path.name} has no `filename` column; columns: {', '.join(rows[0])}")
    listed = set()
    for i, r in enumerate(rows, start=1):
        fn = (r.get("filename") or "").strip()
        path, outside = _confined(source, fn) if fn else (None, None)
        raw = {k: (v.strip() if isinstance(v, str) else v) for k, v in r.items() if k}
        raw["patient_key"] = raw.pop("patient_id", "") or ""
        raw["finding"] = raw.pop("label", "") or ""
        raw["date"] = raw.pop("study_date", None)
        rec = Record(row=i, path=path, kind="dicom", source=DICOM_SOURCE, raw=raw)
        if not fn:
            rec.code, rec.reason = "missing-file", f"{index_path.name} row names no file"
        elif outside:
            rec.code, rec.reason = "path-outside-source", outside
        elif not path.is_file():
            rec.code, rec.reason = "missing-file", f"the file this {index_path.name} row names does not exist"
        else:
            listed.add(path.resolve())
        records.append(rec)
    n = len(rows)
    sidecar = index_path.name == "labels.csv"  # a labels sidecar: files it omits are unlabeled
    for p in files:
        if p.resolve() not in listed:
            n += 1
            if sidecar:
                records.append(Record(row=n, path=p, kind="dicom", source=DICOM_SOURCE, raw={}))
            else:
                records.append(Record(row=n, path=p, kind="dicom", source=DICOM_SOURCE, raw={},
                                      code="not-in-index",
                                      reason=f"file is not listed in {index_path.name} (no label/vitals for it)"))
    return records


# --------------------------------------------------------------------------------------------
# decoding (runs in worker processes)

_HEADER_TAGS = ("PatientID", "StudyDate", "StudyInstanceUID", "SOPInstanceUID", "PatientSex",
                "PatientAge", "InstitutionName")


def image_hash(pixels: np.ndarray) -> str:
    """sha256 over the decoded pixel content (float32 bytes) and its shape."""
    arr = np.ascontiguousarray(pixels, dtype=np.float32)
    h = hashlib.sha256(("x".join(map(str, arr.shape)) + "|").encode())
    h.update(memoryview(arr).cast("B"))  # no copy
    return h.hexdigest()


def _decode_one(task: tuple[int, str, str, int, int]) -> dict:
    idx, path, kind, max_pixels, size = task
    from models.preprocessing import ImageRefused, decode_dicom, load_png, prepare_image

    out: dict[str, Any] = {"idx": idx}
    try:
        data = Path(path).read_bytes()
        if kind == "dicom":
            decoded = decode_dicom(data, max_pixels=max_pixels)
        else:
            decoded = load_png(data, max_pixels=max_pixels)
        pixels = decoded.pixels
        if pixels.size > max_pixels:
            raise ImageRefused("too-many-pixels", f"image has {pixels.size} pixels; the limit is {max_pixels}")
        out["image_hash"] = image_hash(pixels)
        out["array"] = prepare_image(pixels, size).astype(np.float16)
        from pipelines.near_duplicates import phash_of_array

        out["phash"] = phash_of_array(out["array"])
        out["view"] = getattr(decoded, "view", None)
        out["modality"] = getattr(decoded, "modality", None)
        out["photometric"] = getattr(decoded, "photometric", None)
        out["transfer_syntax"] = getattr(decoded, "transfer_syntax", None)
        out["shape"] = tuple(int(s) for s in pixels.shape)
        out["warnings"] = list(getattr(decoded, "warnings", []) or [])
        if kind == "dicom":
            out["header"] = _read_header(data)
    except ImageRefused as exc:
        out["code"] = getattr(exc, "code", "refused")
        out["reason"] = getattr(exc, "reason", str(exc))
    except Exception as exc:  # a decoder bug or unreadable file is a rejection, never a crash
        out["code"] = "undecodable"
        out["reason"] = f"the file could not be decoded ({type(exc).__name__})"
    return out


def _read_header(data: bytes) -> dict:
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=list(_HEADER_TAGS))
    except Exception:
        return {}
    return {t: str(getattr(ds, t, "") or "").strip() for t in _HEADER_TAGS}


def _run_decode(records: list[Record], workers: int, progress_label: str, quiet: bool) -> dict[int, dict]:
    settings = get_settings()
    tasks = [(i, str(r.path), r.kind, settings.max_image_pixels, settings.cache_image_size)
             for i, r in enumerate(records) if r.code is None]
    results: dict[int, dict] = {}
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), transient=True, disable=quiet) as progress:
        bar = progress.add_task(progress_label, total=len(tasks))
        if workers > 1 and len(tasks) >= 16:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for res in pool.map(_decode_one, tasks, chunksize=8):
                    results[res["idx"]] = res
                    progress.advance(bar)
        else:
            for t in tasks:
                res = _decode_one(t)
                results[res["idx"]] = res
                progress.advance(bar)
    return results


# --------------------------------------------------------------------------------------------
# validation, de-identification


def _vitals_input(raw: dict, header: dict) -> dict:
    m: dict[str, Any] = {}
    for f in VITAL_COLUMNS:
        v = raw.get(f)
        m[f] = None if _blank(v) else v
    sex = raw.get("sex")
    if _blank(sex):
        sex = header.get("PatientSex") or None
    m["sex"] = sex
    if m["age_years"] is None and header.get("PatientAge"):
        age = header["PatientAge"]
        mm = re.fullmatch(r"(\d{1,3})([DWMY]?)", age.upper())
        if mm:
            n, unit = int(mm.group(1)), mm.group(2) or "Y"
            m["age_years"] = {"Y": n, "M": n / 12, "W": n / 52, "D": n / 365}[unit]
    return m


def _normalise_view(view: Any) -> str:
    if _blank(view):
        return ""
    s = str(view).strip()
    u = s.upper().replace("_", " ")
    if u in ("PA", "AP"):
        return u
    if u in ("AP SUPINE", "APS", "AP-SUPINE"):
        return "AP Supine"
    if u in ("L", "LL", "LAT", "LATERAL", "RL"):
        return "L"
    return s


_SOURCE_COLUMNS = {PUBLIC_SOURCE: {"temperature_c": "temperature", "spo2_percent": "pO2_saturation",
                                    "age_years": "age", "sex": "sex"}}


def _float(v: Any) -> float:
    return float("nan") if v is None else float(v)


class _UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = sorted((ra, rb))
            self.parent[hi] = lo


def assign_splits(groups: dict[str, tuple[str, int]], seed: int,
                  fractions: tuple[float, ...] = SPLIT_FRACTIONS,
                  order: Sequence[str] | None = None) -> dict[str, str]:
    """Split patient groups {group: (stratum label, n images)} into train/val/test.

    Stratified by the group's label; groups are shuffled with the seed, then each goes to the
    split furthest below its target share of images within the stratum.

    ``order``: the groups' canonical order before the seeded shuffle (default: sorted ids). The
    import passes the source's own order (first source row of each group): group ids are keyed
    pseudonyms, and sorting them would make the split depend on the install's pseudonym key — the
    same data and seed would give a different split on another install.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, str] = {}
    order = list(sorted(groups) if order is None else order)
    if sorted(order) != sorted(groups):
        raise ValueError("order must list every group exactly once")
    by_stratum: dict[str, list[str]] = {}
    for g in order:
        by_stratum.setdefault(groups[g][0], []).append(g)
    for label in sorted(by_stratum):
        members = by_stratum[label]
        perm = rng.permutation(len(members))
        counts = [0] * len(SPLITS)
        total = 0
        for j in perm:
            g = members[j]
            n = groups[g][1]
            total += n
            deficits = [fractions[k] * total - counts[k] for k in range(len(SPLITS))]
            k = int(np.argmax(deficits))
            counts[k] += n
            out[g] = SPLITS[k]
        _fill_empty_splits(out, [members[j] for j in perm], groups)
    _fill_empty_splits(out, order, groups)
    return out


def _fill_empty_splits(out: dict[str, str], members: list[str], groups: dict[str, tuple[str, int]]) -> None:
    """With 3+ groups, no split stays empty: move the smallest group of the fullest split into it
    (small cohorts and small strata would otherwise put every group into train)."""
    if len(members) < 3:
        return
    for target in ("test", "val"):
        by_split = {s: [g for g in members if out[g] == s] for s in SPLITS}
        if by_split[target]:
            continue
        donor = max((s for s in SPLITS if len(by_split[s]) > 1), key=lambda s: len(by_split[s]), default=None)
        if donor is None:
            return
        g = min(by_split[donor], key=lambda x: (groups[x][1], members.index(x)))
        out[g] = target


# --------------------------------------------------------------------------------------------
# the import


def _role_of(actor: str) -> str:
    try:
        from compliance import users  # type: ignore

        getter = getattr(users, "get_user", None)
        if getter:
            u = getter(actor)
            if u is not None:
                return getattr(u, "role", "unknown")
    except Exception:
        pass
    return "unknown"


def _validate_name(name: str) -> None:
    if not NAME_RE.match(name or ""):
        raise DatasetImportError(f"invalid dataset name {name!r}: use letters, digits, '_' and '-' (max 64)")


def _ingest(source: Path, *, seed: int, batch: int, tag: str | None, workers: int, quiet: bool,
            existing=None, declared_source: str | None = None) -> tuple[list[dict], list[dict], dict[int, np.ndarray], dict]:
    """Process one source; returns (accepted rows, rejected rows, arrays by accepted index, info)."""
    from models.preprocessing import VitalsError, parse_vitals

    source = Path(source)
    if not source.exists():
        raise DatasetImportError(f"source {source} does not exist")
    if not source.is_dir():
        raise DatasetImportError(f"source {source} is not a folder (expected DICOM files + vitals.csv, "
                           "or metadata.csv + images/)")
    layout = detect_layout(source)
    records = _public_records(source) if layout == "public" else _dicom_records(source)
    if not records:
        raise DatasetImportError(f"source {source} holds no files to import")
    pseudo = Pseudonymizer(get_settings().secret("pseudonym_key"))
    decoded = _run_decode(records, workers, f"decoding {len(records)} records", quiet)

    rows: list[dict] = []  # per record: evaluated fields + status
    for i, rec in enumerate(records):
        res = decoded.get(i, {})
        header = res.get("header", {}) or {}
        raw = rec.raw
        code, reason = rec.code, rec.reason
        if code is None and "code" in res:
            code, reason = res["code"], res["reason"]
        # pseudonymous patient id (source id never leaves this function)
        key = raw.get("patient_key") or header.get("PatientID") or ""
        if key:
            pid = pseudo.patient(rec.source, key)
        elif res.get("image_hash"):
            pid = "p-anon-" + res["image_hash"][:10]
        else:
            pid = "p-unknown"
        shift = pseudo.date_shift_days(pid)
        d, year = parse_date(raw.get("date") if not _blank(raw.get("date")) else header.get("StudyDate"))
        if d is not None:
            d = d - timedelta(days=shift)
            year = d.year
        from pipelines.labels import classify_finding

        decision = classify_finding(raw.get("finding"), free_text=rec.source == PUBLIC_SOURCE)
        label = decision.label
        view = _normalise_view(raw.get("view")) or _normalise_view(res.get("view"))
        site = raw.get("site") or header.get("InstitutionName") or "unknown"
        variant = tag if tag is not None else (raw.get("variant") or "")
        row: dict[str, Any] = {
            "idx": i, "batch": batch, "source_row": rec.row, "patient_id": pid, "label": label,
            "finding": "" if _blank(raw.get("finding")) else str(raw.get("finding")), "view": view,
            "site": str(site), "source": _provenance_source(rec, declared_source), "variant": str(variant),
            "origin": _origin(raw), "label_source": _label_source(rec, raw, label),
            "phash": res.get("phash") or "",
            "study_date": d.isoformat() if d else "", "study_year": year,
            "modality": res.get("modality") or raw.get("modality") or "",
            "image_hash": res.get("image_hash"),
        }
        vin = _vitals_input(raw, header)
        if code is None and view == "L":
            code, reason = "lateral-view", ("lateral (L) view; the model takes frontal chest radiographs "
                                            "(PA, AP or AP Supine)")
        vitals: dict[str, Any] = {}
        if code is None:
            try:
                vitals = parse_vitals(vin)
            except VitalsError as exc:
                code = "vitals-out-of-range"
                fld = getattr(exc, "field", "vitals")
                src_col = _SOURCE_COLUMNS.get(rec.source, {}).get(fld)
                where = f"{fld} (source column {src_col})" if src_col else fld
                reason = f"{where}: {getattr(exc, 'reason', str(exc))} (rejected, never clipped)"
            except (ValueError, TypeError) as exc:
                code, reason = "vitals-invalid", str(exc)
        if code is None and label is None:
            code, reason = decision.code or "unknown-label", decision.reason or (
                f"label {raw.get('finding')!r} is not one of covid19, other_pneumonia, normal, unlabeled")
        row["code"], row["reason"] = code, reason
        row["raw_vitals"] = vin
        row["vitals"] = vitals
        if code is None:
            row["photometric"] = res.get("photometric") or ""
            row["transfer_syntax"] = res.get("transfer_syntax") or ""
            shape = res.get("shape") or (None, None)
            row["orig_height"], row["orig_width"] = shape[0], shape[1]
            row["warnings"] = "; ".join(res.get("warnings") or [])
            row["study_uid"] = pseudo.uid(header["StudyInstanceUID"]) if header.get("StudyInstanceUID") else ""
            row["sop_uid"] = pseudo.uid(header["SOPInstanceUID"]) if header.get("SOPInstanceUID") else ""
            off = raw.get("offset")
            row["days_since_onset"] = float("nan") if _blank(off) else float(off)
        rows.append(row)

    # --- dedupe by image content; link patients sharing an image ---
    uf = _UnionFind()
    existing_by_hash: dict[str, dict] = {}
    if existing is not None and len(existing):
        for r in existing.itertuples(index=False):
            uf.union(r.patient_id, r.split_group)
            existing_by_hash[r.image_hash] = {"batch": int(r.batch), "source_row": int(r.source_row),
                                              "patient_id": r.patient_id}
    by_hash: dict[str, list[dict]] = {}
    for row in rows:
        uf.find(row["patient_id"])
        if row["image_hash"]:
            by_hash.setdefault(row["image_hash"], []).append(row)
    for h, group in by_hash.items():
        for other in group[1:]:
            uf.union(group[0]["patient_id"], other["patient_id"])
        if h in existing_by_hash:
            twin = existing_by_hash[h]
            uf.union(twin["patient_id"], group[0]["patient_id"])
            for row in group:
                _mark_duplicate(row, twin["source_row"], twin["patient_id"], twin["batch"], batch)
            continue
        if len(group) < 2:
            continue
        keeper = next((r for r in group if r["code"] is None), group[0])
        for row in group:
            if row is keeper:
                if row["code"] is not None:
                    others = ", ".join(str(r["source_row"]) for r in group if r is not keeper)
                    row["reason"] += f" (the same image is also listed at row {others})"
                continue
            _mark_duplicate(row, keeper["source_row"], keeper["patient_id"], keeper["batch"], batch)

    accepted = [r for r in rows if r["code"] is None]
    rejected = [r for r in rows if r["code"] is not None]
    near_pairs, link_distance = _link_near_duplicates(accepted, uf, existing)

    # --- split by patient group ---
    existing_split: dict[str, str] = {}
    existing_group: dict[str, str] = {}
    if existing is not None and len(existing):
        for r in existing.itertuples(index=False):
            existing_split[uf.find(r.patient_id)] = r.split
            existing_group[uf.find(r.patient_id)] = r.split_group
    new_groups: dict[str, list[dict]] = {}
    for r in accepted:
        g = uf.find(r["patient_id"])
        r["split_group"] = existing_group.get(g, g)
        if g not in existing_split:
            new_groups.setdefault(g, []).append(r)
    group_info = {}
    for g, members in new_groups.items():
        labels = Counter(m["label"] for m in members if m["label"] != "unlabeled")
        stratum = labels.most_common(1)[0][0] if labels else "unlabeled"
        group_info[g] = (stratum, len(members))
    # the source's row order, not the (keyed, install-specific) pseudonyms, orders the groups
    first_row = {}
    for r in accepted:
        first_row.setdefault(uf.find(r["patient_id"]), (r["batch"], r["source_row"]))
    splits = assign_splits(group_info, seed, order=sorted(group_info, key=lambda g: first_row[g]))
    splits.update(existing_split)
    arrays: dict[int, np.ndarray] = {}
    manifest_rows = []
    for r in accepted:
        r["split"] = splits[uf.find(r["patient_id"])]
        v = r["vitals"]
        age = v.get("age_years")
        if age is not None and age > 89:
            age = MAX_REPORTED_AGE
        out = {c: r.get(c) for c in MANIFEST_COLUMNS}
        out.update({f: _float(v.get(f)) for f in VITAL_COLUMNS})
        out["age_years"] = _float(age)
        out["sex"] = v.get("sex") or "unknown"
        out["array_path"] = f"arrays/{r['image_hash']}.npy"
        manifest_rows.append(out)
        arrays[len(manifest_rows) - 1] = decoded[r["idx"]]["array"]
    rejected_rows = []
    for r in rejected:
        vin = r["raw_vitals"]
        out = {c: r.get(c, "") for c in REJECTED_COLUMNS}
        out.update({f: ("" if vin.get(f) is None else vin.get(f)) for f in VITAL_COLUMNS})
        age = vin.get("age_years")
        try:
            if age is not None and float(age) > 89:
                out["age_years"] = MAX_REPORTED_AGE
        except (TypeError, ValueError):
            pass
        out["sex"] = vin.get("sex") or ""
        out["label"] = r["label"] or ""
        rejected_rows.append(out)
    for pair in near_pairs:  # the split each twin ended in (one split group: the same split)
        pair["split_a"] = splits.get(uf.find(pair["patient_a"]))
        pair["split_b"] = splits.get(uf.find(pair["patient_b"]))
    info = {"layout": layout, "source_kind": PUBLIC_SOURCE if layout == "public" else DICOM_SOURCE,
            "n_input": len(records), "key_id": pseudo.key_id, "near_duplicate_pairs": near_pairs,
            "near_duplicate_distance": link_distance}
    return manifest_rows, rejected_rows, arrays, info


def _provenance_source(rec: Record, declared: str | None) -> str:
    """The collection/provider an image came from: ``--source`` at import, else the index's ``source``
    column, else the layout (``covid-chestxray-dataset`` / ``dicom``: an undeclared DICOM provider)."""
    if declared:
        return str(declared).strip()
    col = rec.raw.get("source")
    return str(col).strip() if not _blank(col) else rec.source


def _origin(raw: dict) -> str:
    """Per-image publisher (web host of the public collection's ``url``, else the DOI prefix): no path,
    no case number."""
    url = str(raw.get("url") or "").strip()
    if url:
        from urllib.parse import urlparse

        host = (urlparse(url).hostname or "").lower()
        if host.startswith("www."):
            host = host[4:]
        if host:
            return host
    doi = str(raw.get("doi") or "").strip()
    if doi:
        return "doi:" + doi.split("/")[0]
    return str(raw.get("origin") or "").strip() if not _blank(raw.get("origin")) else ""


def _label_source(rec: Record, raw: dict, label: str | None) -> str:
    from pipelines.labels import normalise_label_source, public_label_source

    if label in (None, "unlabeled"):
        return "unknown"
    if rec.source == PUBLIC_SOURCE:
        return public_label_source(label, raw.get("notes") or "")
    return normalise_label_source(raw.get("label_source"))


def _link_near_duplicates(accepted: list[dict], uf: "_UnionFind", existing) -> tuple[list[dict], int]:
    """Link the patients of near-duplicate images (pHash) into one split group; return the pairs
    (source rows, pseudonymous patients, distance) for the import summary and the distance used."""
    from pipelines.near_duplicates import find_near_duplicate_pairs

    old = []
    if existing is not None and len(existing) and "phash" in existing:
        old = [{"phash": r.phash, "image_hash": r.image_hash, "patient_id": r.patient_id,
                "source_row": int(r.source_row), "batch": int(r.batch)} for r in existing.itertuples(index=False)]
    found = find_near_duplicate_pairs(accepted, existing=old)
    distance = choose_link_distance([p["distance"] for p in found], len(accepted) + len(old))
    pairs = []
    for p in found:
        if p["distance"] > distance:
            continue
        a = accepted[p["a"]]
        b = old[p["b"]] if p["b_existing"] else accepted[p["b"]]
        uf.union(a["patient_id"], b["patient_id"])
        pairs.append({"row_a": int(a["source_row"]), "batch_a": int(a["batch"]), "row_b": int(b["source_row"]),
                      "batch_b": int(b["batch"]), "patient_a": a["patient_id"], "patient_b": b["patient_id"],
                      "distance": int(p["distance"])})
    return pairs, distance


def choose_link_distance(distances: list[int], n_images: int) -> int:
    """The pHash distance up to which pairs are linked: the default (6 bits) unless that yields more
    pairs than 10 % of the images (at least 10), a sign the hash does not tell this data's images
    apart (measured: the synthetic cohort's smooth phantoms are within 6 bits of each other by the
    hundred, while the public collection has 15 pairs in 494 images); then tightened (4, 2, 0) until
    it does not, so linking cannot collapse the split into one group."""
    from models.provenance import NEAR_DUPLICATE_DISTANCE

    limit = max(10, int(0.1 * n_images))
    for d in range(NEAR_DUPLICATE_DISTANCE, -1, -2):
        if sum(x <= d for x in distances) <= limit:
            return d
    return -1  # even identical hashes are too common: link nothing (pairs at 0 are still reported as found)


def _mark_duplicate(row: dict, twin_row: int, twin_patient: str, twin_batch: int, batch: int) -> None:
    where = f"row {twin_row}" if twin_batch == batch else f"batch {twin_batch} row {twin_row}"
    own = f"; this row would also be rejected: {row['reason']}" if row["code"] is not None else ""
    row["code"] = "duplicate-image"
    row["reason"] = (f"same image content as source {where} (patient {twin_patient}); an image is kept "
                     f"once and both patients are kept in one split{own}")
    row["duplicate_of_row"] = twin_row
    row["duplicate_of_patient"] = twin_patient


def _write(root: Path, manifest_rows: list[dict], rejected_rows: list[dict],
           arrays: dict[int, np.ndarray], meta: dict, existing=None, existing_rejected=None):
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "arrays").mkdir(parents=True, exist_ok=True)
    for i, arr in arrays.items():
        path = root / manifest_rows[i]["array_path"]
        if not path.exists():
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, arr.astype(np.float16))
            os.replace(tmp, path)
    df = pd.DataFrame(manifest_rows, columns=MANIFEST_COLUMNS)
    if existing is not None and len(existing):
        df = pd.concat([existing[MANIFEST_COLUMNS], df], ignore_index=True)
    df = _typed(df)
    rej = pd.DataFrame(rejected_rows, columns=REJECTED_COLUMNS)
    if existing_rejected is not None and len(existing_rejected):
        rej = pd.concat([existing_rejected, rej], ignore_index=True)
    meta = dict(meta)
    meta.update({
        "n_rows": int(len(df)), "n_rejected": int(len(rej)),
        "by_label": _counts(df["label"]), "by_split": _counts(df["split"]),
        "by_site": _counts(df["site"]), "by_view": _counts(df["view"]),
        "n_patients": int(df["patient_id"].nunique()),
    })
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           b"cxr": json.dumps(meta, sort_keys=True).encode()})
    tmp = root / "manifest.parquet.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, root / "manifest.parquet")
    rej.to_csv(root / "rejected.csv", index=False)
    return df, rej, meta


def _typed(df):
    import pandas as pd

    for c in VITAL_COLUMNS + ("days_since_onset",):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    for c in ("batch", "source_row"):
        df[c] = df[c].astype("int64")
    for c in ("study_year", "orig_height", "orig_width"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    for c in MANIFEST_COLUMNS:
        if c not in VITAL_COLUMNS and c not in ("days_since_onset", "batch", "source_row", "study_year",
                                                "orig_height", "orig_width"):
            df[c] = df[c].fillna("").astype(str)
    return df


def _counts(series) -> dict:
    return {str(k): int(v) for k, v in sorted(Counter(series).items(), key=lambda kv: str(kv[0]))}


def _summary(name, info, batch, manifest_rows, rejected_rows, root, seconds, workers) -> ImportSummary:
    return ImportSummary(
        name=name, source_kind=info["source_kind"], batch=batch, n_input=info["n_input"],
        n_accepted=len(manifest_rows), n_rejected=len(rejected_rows),
        by_label=_counts(r["label"] for r in manifest_rows),
        by_split=_counts(r["split"] for r in manifest_rows),
        by_site=_counts(r["site"] for r in manifest_rows),
        by_view=_counts(r["view"] or "unknown" for r in manifest_rows),
        by_code=_counts(r["code"] for r in rejected_rows),
        n_patients=len({r["patient_id"] for r in manifest_rows}),
        near_duplicate_pairs=list(info.get("near_duplicate_pairs") or []),
        near_duplicate_distance=info.get("near_duplicate_distance"),
        confounding=_confounding(manifest_rows),
        root=root, seconds=seconds, workers=workers)


def _confounding(manifest_rows: list[dict]) -> dict:
    """Cramér's V of site and source against the label, with counts and a warning when strong."""
    import pandas as pd

    from models.confounding import confounding_summary

    if not manifest_rows:
        return {}
    return confounding_summary(pd.DataFrame(manifest_rows, columns=["label", "site", "source"]))


def default_workers() -> int:
    """Decode processes: 2 where there are 2+ cores (``CXR_INGEST_WORKERS`` overrides).

    Measured (benchmarks/RESULTS.md, a 2-core box shared with other jobs): on 2048² files 2
    processes gave +14 % and +30 % files/s in two runs; on 512² files and the synthetic cohort the
    difference was within run-to-run noise (−35 % … +22 %). Imports of fewer than 16 files always
    run in-process."""
    env = os.environ.get("CXR_INGEST_WORKERS")
    if env:
        return max(1, int(env))
    return min(2, os.cpu_count() or 1)


def import_dataset(source: Path, name: str, *, seed: int = 42, actor: str | None = None,
                   tag: str | None = None, track: bool = True, force: bool = False,
                   workers: int | None = None, quiet: bool = False,
                   source_name: str | None = None) -> ImportSummary:
    """Import ``source`` as dataset ``name`` (``data/<name>/``); DVC-track it when ``track``."""
    import shutil

    from compliance.audit import record_event

    _validate_name(name)
    actor = acting_user(actor)
    workers = workers or default_workers()
    root = get_settings().data_dir / name
    if (root / "manifest.parquet").exists() and not force:
        raise DatasetImportError(f"dataset {name!r} already exists at {root}; add data with "
                           f"`cxr data add-batch SOURCE --to {name} --tag TAG` or re-import with --force")
    t0 = time.perf_counter()
    manifest_rows, rejected_rows, arrays, info = _ingest(Path(source), seed=seed, batch=0, tag=tag,
                                                         workers=workers, quiet=quiet, declared_source=source_name)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    meta = {"name": name, "seed": seed, "source_kind": info["source_kind"],
            "pseudonym_key_id": info["key_id"], "cache_image_size": get_settings().cache_image_size,
            "split_fractions": list(SPLIT_FRACTIONS),
            "batches": [{"batch": 0, "tag": tag or "", "source_kind": info["source_kind"],
                         "n_input": info["n_input"], "n_accepted": len(manifest_rows),
                         "n_rejected": len(rejected_rows)}],
            "near_duplicate_pairs": info["near_duplicate_pairs"],
            "near_duplicate_distance": info["near_duplicate_distance"]}
    _write(root, manifest_rows, rejected_rows, arrays, meta)
    seconds = time.perf_counter() - t0
    summary = _summary(name, info, 0, manifest_rows, rejected_rows, root, seconds, workers)
    role = _role_of(actor)
    record_event("dataset.imported", actor=actor, role=role, subject=f"dataset:{name}",
                 details=summary.counts())
    if track:
        from pipelines.dvc_store import track_dataset

        summary.dvc_md5 = track_dataset(name)
        record_event("dataset.versioned", actor=actor, role=role, subject=f"dataset:{name}",
                     details={"dvc_md5": summary.dvc_md5, "rows": summary.n_accepted, "batch": 0,
                              "git_commit": git_commit(get_settings().project_root)})
    return summary


def add_batch(source: Path, name: str, *, tag: str, seed: int = 42, actor: str | None = None,
              track: bool = True, workers: int | None = None, quiet: bool = False) -> ImportSummary:
    """Append a new labelled batch to dataset ``name``; existing rows keep their split."""
    import pandas as pd

    from compliance.audit import record_event
    from models.datasets import read_manifest_metadata

    _validate_name(name)
    actor = acting_user(actor)
    workers = workers or default_workers()
    root = get_settings().data_dir / name
    if not (root / "manifest.parquet").exists():
        raise DatasetImportError(f"dataset {name!r} not found at {root}: import it first with "
                           f"`cxr data import SOURCE --name {name}` (or `dvc pull data/{name}.dvc`)")
    existing = pd.read_parquet(root / "manifest.parquet")
    for col in ("label_source", "origin", "phash"):  # manifests written before issue 13
        if col not in existing:
            existing[col] = "unknown" if col == "label_source" else ""
    existing_rej = pd.read_csv(root / "rejected.csv", dtype=str, keep_default_na=False)
    meta = read_manifest_metadata(root / "manifest.parquet")
    batch = max([b["batch"] for b in meta.get("batches", [])] + [int(existing["batch"].max())
                                                               if len(existing) else 0]) + 1
    t0 = time.perf_counter()
    manifest_rows, rejected_rows, arrays, info = _ingest(Path(source), seed=seed + batch, batch=batch,
                                                         tag=tag, workers=workers, quiet=quiet,
                                                         existing=existing)
    from pipelines.dvc_store import dataset_md5

    # lineage: the DVC version this batch was added to (the new version's own hash cannot be
    # inside the folder it hashes; it lives in data/<name>.dvc)
    meta.setdefault("batches", []).append({"batch": batch, "tag": tag, "source_kind": info["source_kind"],
                                           "n_input": info["n_input"], "n_accepted": len(manifest_rows),
                                           "n_rejected": len(rejected_rows),
                                           "parent_dvc_md5": dataset_md5(name) or ""})
    meta["near_duplicate_pairs"] = list(meta.get("near_duplicate_pairs") or []) + info["near_duplicate_pairs"]
    _write(root, manifest_rows, rejected_rows, arrays, meta, existing=existing, existing_rejected=existing_rej)
    seconds = time.perf_counter() - t0
    summary = _summary(name, info, batch, manifest_rows, rejected_rows, root, seconds, workers)
    role = _role_of(actor)
    record_event("dataset.batch_added", actor=actor, role=role, subject=f"dataset:{name}",
                 details={**summary.counts(), "tag": tag})
    if track:
        from pipelines.dvc_store import track_dataset

        summary.dvc_md5 = track_dataset(name)
        record_event("dataset.versioned", actor=actor, role=role, subject=f"dataset:{name}",
                     details={"dvc_md5": summary.dvc_md5, "rows": int(len(existing) + len(manifest_rows)),
                              "batch": batch, "git_commit": git_commit(get_settings().project_root)})
    return summary


def print_summary(summary: ImportSummary, console=None) -> None:
    """Rich tables: counts by label, split, site, view and rejection reason (no PHI)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    title = (f"dataset {summary.name} — batch {summary.batch}: {summary.n_input} records, "
             f"{summary.n_accepted} accepted, {summary.n_rejected} rejected, {summary.n_patients} patients")
    table = Table(title=title, show_lines=False)
    table.add_column("by")
    table.add_column("value")
    table.add_column("count", justify="right")
    for section, counts in (("label", summary.by_label), ("split", summary.by_split),
                            ("view", summary.by_view), ("rejected", summary.by_code)):
        for k, v in counts.items():
            table.add_row(section, k, str(v))
        table.add_section()
    sites = sorted(summary.by_site.items(), key=lambda kv: -kv[1])
    for k, v in sites[:10]:
        table.add_row("site", k, str(v))
    if len(sites) > 10:
        table.add_row("site", f"({len(sites) - 10} more sites)", str(sum(v for _, v in sites[10:])))
    console.print(table)
    pairs = summary.near_duplicate_pairs
    used = summary.near_duplicate_distance
    console.print(f"near-duplicate image pairs (pHash distance <= {_near_distance() if used is None else used}), "
                  f"linked into one split group: {len(pairs)}")
    if used is not None and used < _near_distance():
        console.print(f"[yellow]note:[/] at {_near_distance()} bits the perceptual hash matched too many image pairs "
                      f"to be near duplicates (it does not tell these images apart); linked only <= {used} bits")
    if pairs:
        nd = Table(show_lines=False)
        for col in ("row a", "row b", "distance", "split a", "split b"):
            nd.add_column(col)
        for p in pairs[:25]:
            nd.add_row(f"{p['row_a']}" + (f" (batch {p['batch_a']})" if p.get("batch_a") else ""),
                       f"{p['row_b']}" + (f" (batch {p['batch_b']})" if p.get("batch_b") else ""),
                       str(p["distance"]), str(p.get("split_a")), str(p.get("split_b")))
        if len(pairs) > 25:
            nd.add_row(f"({len(pairs) - 25} more)", "", "", "", "")
        console.print(nd)
    for attr in ("site", "source"):
        c = (summary.confounding or {}).get(attr)
        if c and c.get("cramers_v") is not None:
            console.print(f"{attr} ↔ label: Cramér's V {c['cramers_v']:.2f} ({c['strength']}; n={c['n']}, "
                          f"{c['n_values']} {attr} values, {c['n_single_label_values']} hold a single label "
                          f"= {c['n_images_in_single_label_values']} images)")
    for w in (summary.confounding or {}).get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {w}")
    rate = f"{summary.files_per_s:.1f} records/s, {summary.workers} worker(s)"
    console.print(f"took {summary.seconds:.1f} s ({rate})")
    if summary.dvc_md5:
        console.print(f"DVC version: [bold]{summary.dvc_md5}[/bold] (data/{summary.name}.dvc) — "
                      f"commit data/{summary.name}.dvc and data/.gitignore to record it in git")


def _near_distance() -> int:
    from models.provenance import NEAR_DUPLICATE_DISTANCE

    return NEAR_DUPLICATE_DISTANCE
