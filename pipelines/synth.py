"""Synthetic chest-radiograph + vitals cohort, written as real DICOM files and a ``vitals.csv``.

``synthesize_cohort(n_patients, out_dir, seed=0, variant=None, image_size=512)`` writes

- ``out_dir/p00001_s1.dcm`` … one file per study (1–3 studies per patient): CR or DX, PA or AP,
  fake but realistic-looking PatientName / PatientID / AccessionNumber / birth and study dates /
  institution (so de-identification is exercised), mixed transfer syntaxes (explicit and implicit
  VR little endian, explicit VR big endian, deflated, RLE lossless, JPEG 2000 lossless, JPEG-LS
  lossless when pyjpegls is installed), MONOCHROME1 on part of the CR plates, BitsStored 8–16,
  rescale slope/intercept and a VOI window on some;
- ``out_dir/vitals.csv``: ``CSV_COLUMNS`` (one row per file; empty cell = missing value).

Images are a frontal chest phantom (body outline, two lung fields, mediastinum and heart, spine,
clavicles, posterior ribs, diaphragm domes, heel effect, quantum noise) in attenuation convention
(bright = dense), with a class signal a radiologist would name:

- ``covid19``: bilateral, peripheral, lower-zone ground-glass opacities (hazy, vessels still seen);
- ``other_pneumonia``: unilateral dense lobar consolidation bounded by a fissure;
- ``normal``: clear lungs.

Vitals follow the class (covid19: fever and low SpO2, tachypnoea; other_pneumonia: higher fever,
tachycardia; normal: normal), with noise and ~20 % missing values per field. ``variant`` (see
``VARIANTS``) shifts appearance and vitals, e.g. ``omicron``: fainter upper-zone/perihilar covid
opacities, a different detector contrast, milder fever and normal SpO2 — a model trained on the
base cohort loses sensitivity on it. Everything is drawn from ``numpy.random.default_rng`` seeded
by (seed, variant, patient): the same arguments give byte-identical files.

``confound`` (see ``CONFOUNDS``) makes a cohort a shortcut-learning model can exploit, like the
public collections (issue 14): ``site`` — the site follows the label (covid19 at
``synthetic-site-a`` with probability ``CONFOUND_SITE_P``, the other classes at sites b–d), every image
carries its site's marker burned into a border corner outside the lung fields (``burn_site_marker``:
a bright block, as printed labels are), and the covid19 signal in the lungs is faint
(× ``CONFOUND_COVID_AMPLITUDE``): the marker, not the lungs, is what tells covid19 from normal;
``missingness`` — SpO2 is never recorded for other_pneumonia/normal and recorded for 25 % of covid19
(public collection: 0/85 vs 99/427); ``all`` — both. The unconfounded cohort (no ``confound``) draws
the site independently of the label and has no marker.
"""
from __future__ import annotations

import csv
import datetime as dt
import io
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

CLASSES = ("covid19", "other_pneumonia", "normal")
CLASS_MIX = (0.4, 0.3, 0.3)
CSV_COLUMNS = [
    "filename", "patient_id", "label", "site", "study_date", "view", "sex", "age_years", "temperature_c",
    "spo2_percent", "heart_rate_bpm", "respiratory_rate", "systolic_bp_mmhg", "variant",
]
MISSING_RATE = 0.2  # per vital field and study
CONFOUNDS = ("site", "missingness", "all")
# site-confounded cohort (issue 14): covid19 at site a with this probability, other classes at site a with
# 1 - it; the marker alone then ranks covid19 vs rest at AUROC ~0.97, and the lung signal is faint
# enough (× 0.1) that a model trained on it relies on the marker — with 0.9 and × 0.35 the model read
# the lungs as much as the marker and its masked-lung AUROC (ceiling 0.9) ranged 0.58–0.87 by seed
CONFOUND_SITE_P = 0.97
CONFOUND_COVID_AMPLITUDE = 0.1
# marker block per site index, (row0, row1, col0, col1) as fractions: the four border corners
SITE_MARKERS = ((0.03, 0.10, 0.04, 0.20), (0.03, 0.10, 0.80, 0.96), (0.90, 0.97, 0.04, 0.20), (0.90, 0.97, 0.80, 0.96))
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's UID root; suffixes are deterministic hashes


@dataclass(frozen=True)
class SiteProfile:
    """One hospital's radiography equipment (how its images are encoded and look)."""

    name: str
    institution: str
    modality: str  # CR or DX
    manufacturer: str
    bits_stored: tuple[int, ...]
    encodings: tuple[str, ...]  # transfer syntax keywords (pydicom.uid attribute names)
    monochrome1_rate: float
    rescale_rate: float
    window_rate: float
    noise: float
    aspect: float  # columns / rows
    ap_rate: float  # share of AP (portable) views


SITES = (
    SiteProfile("synthetic-site-a", "North Valley Synthetic Hospital", "CR", "SYNTHCO CR-100", (10, 12),
                ("ExplicitVRLittleEndian", "ImplicitVRLittleEndian", "JPEG2000Lossless"), 0.6, 0.0, 0.5, 0.018, 1.0, 0.3),
    SiteProfile("synthetic-site-b", "Riverside Synthetic Medical Center", "DX", "FAKEVENDOR DR-9", (12, 14),
                ("RLELossless", "JPEGLSLossless", "DeflatedExplicitVRLittleEndian"), 0.0, 0.6, 0.4, 0.012, 1.0, 0.25),
    SiteProfile("synthetic-site-c", "St. Example University Hospital", "DX", "PHANTOMIX DX-3", (16, 12),
                ("ExplicitVRBigEndian", "JPEG2000Lossless", "ExplicitVRLittleEndian"), 0.0, 0.3, 0.7, 0.010, 0.875, 0.2),
    SiteProfile("synthetic-site-d", "Lakeside Synthetic Community Clinic", "CR", "SYNTHCO CR-50", (8, 10),
                ("RLELossless", "ImplicitVRLittleEndian", "DeflatedExplicitVRLittleEndian"), 0.4, 0.2, 0.0, 0.022, 1.0, 0.4),
)


@dataclass(frozen=True)
class VariantProfile:
    """A shift of appearance and vitals (a "new variant" batch)."""

    name: str
    description: str
    covid_zone: str  # "lower-peripheral" (base) or "upper-central"
    covid_amplitude: float  # multiplier on the base opacity amplitude
    gamma: float  # detector contrast curve applied to the whole image
    noise_factor: float
    date_start: dt.date
    covid_vitals: dict  # field -> (mean, sd)


BASE = VariantProfile("", "base cohort", "lower-peripheral", 1.0, 1.0, 1.0, dt.date(2020, 3, 1), {})
VARIANTS = {
    "omicron": VariantProfile(
        "omicron", "fainter upper-zone/perihilar covid opacities, flatter detector contrast, milder fever, normal SpO2",
        "upper-central", 0.55, 0.75, 1.3, dt.date(2022, 1, 3),
        {"temperature_c": (37.6, 0.6), "spo2_percent": (96.3, 1.6), "heart_rate_bpm": (90, 13),
         "respiratory_rate": (18, 3.0)},
    ),
}

# mean, sd per class; clipped into the valid ranges of models.preprocessing.VITAL_RANGES
VITALS_BY_CLASS = {
    "covid19": {"temperature_c": (38.3, 0.7), "spo2_percent": (90.5, 3.5), "heart_rate_bpm": (96, 14),
                "respiratory_rate": (24, 4.5), "systolic_bp_mmhg": (124, 17), "age_years": (58, 15)},
    "other_pneumonia": {"temperature_c": (38.8, 0.7), "spo2_percent": (94.0, 2.5), "heart_rate_bpm": (110, 15),
                        "respiratory_rate": (23, 4.0), "systolic_bp_mmhg": (116, 18), "age_years": (62, 17)},
    "normal": {"temperature_c": (36.8, 0.35), "spo2_percent": (97.6, 1.2), "heart_rate_bpm": (76, 11),
               "respiratory_rate": (15, 2.5), "systolic_bp_mmhg": (126, 15), "age_years": (48, 17)},
}
VITAL_CLIP = {"temperature_c": (34.5, 41.5), "spo2_percent": (70, 100), "heart_rate_bpm": (40, 180),
              "respiratory_rate": (8, 45), "systolic_bp_mmhg": (80, 210), "age_years": (18, 95)}
VITAL_DECIMALS = {"temperature_c": 1, "spo2_percent": 0, "heart_rate_bpm": 0, "respiratory_rate": 0,
                  "systolic_bp_mmhg": 0, "age_years": 0}

_FIRST_F = ["ANNA", "MARIA", "SOFIA", "EMMA", "LUCIA", "HANNAH", "GRACE", "AMIRA", "YUKI", "NADIA", "CLARA", "INES"]
_FIRST_M = ["JAMES", "LUCAS", "NOAH", "OMAR", "MATEO", "DAVID", "KENJI", "ARJUN", "PAUL", "IVAN", "LEON", "SAMUEL"]
_LAST = ["SYNTHWELL", "FAKESON", "MOCKRIDGE", "PLACEHOLM", "TESTERMAN", "DUMMIER", "SAMPLEY", "EXAMPLAR",
         "PROTOVIC", "SIMULOVA", "NOTREAL", "FICTORINI", "IMAGINO", "PSEUDOWSKI"]


def _rng(seed: int, variant: str, *parts: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(variant.encode()), *parts])


def _uid(*parts: object) -> str:
    digest = zlib.crc32("|".join(map(str, parts)).encode())
    digest2 = zlib.adler32("|".join(map(str, parts[::-1])).encode())
    return f"{UID_ROOT}{digest}.{digest2}.{len(parts)}"


# ------------------------------------------------------------------------------------------------
# Image phantom
# ------------------------------------------------------------------------------------------------
def _sig(x: np.ndarray, soft: float) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(x / soft))


def render_chest(
    rng: np.random.Generator,
    rows: int,
    cols: int,
    label: str,
    severity: float,
    anatomy: dict,
    variant: VariantProfile = BASE,
    noise: float = 0.015,
) -> np.ndarray:
    """A frontal (PA) chest radiograph phantom: float32 (rows, cols) in [0, 1], bright = dense.

    Image left = patient's right (radiological convention). ``severity`` in [0, 1] scales the
    opacities; ``anatomy`` holds per-patient shape parameters (see ``_anatomy``).
    """
    v, u = np.mgrid[0:rows, 0:cols].astype(np.float32)
    v /= rows
    u /= cols
    cx = anatomy["cx"] + rng.normal(0, 0.006)
    top = anatomy["lung_top"]
    soft = 0.012

    body = _sig(1.0 - np.abs((u - cx) / anatomy["body_w"]) ** 3 - ((v - 0.70) / 0.72) ** 2, 0.05)
    img = 0.04 + 0.50 * body
    # shoulders/neck soft tissue above the lungs
    img += 0.08 * body * _sig(top + 0.04 - v, 0.04)

    lung = np.zeros_like(u)
    lungs = {}
    for side in (-1.0, 1.0):  # -1 = image left = patient's right
        lx = cx + side * anatomy["lung_dx"]
        dome = anatomy["dome"] + (-0.015 if side < 0 else 0.0)
        ly = dome - 0.06
        ay = ly - top
        ax = anatomy["lung_w"]
        # apex narrower than the base: the half-width grows towards the diaphragm
        ax_v = ax * (0.68 + 0.32 * np.clip((v - top) / (ay + 1e-6), 0.0, 1.0) ** 0.5)
        ex = np.abs((u - lx) / ax_v) ** 2.2 + np.abs((v - ly) / ay) ** 2.0
        dome_curve = dome - 0.05 * np.clip(1.0 - ((u - lx) / (ax * 1.1)) ** 2, 0.0, 1.0)
        m = _sig(1.0 - ex, 0.08) * _sig(dome_curve - v, soft)
        ly = (top + dome) / 2.0
        lungs[side] = (m, lx, ly, ax, ay, dome)
        lung = np.maximum(lung, m)
    img -= 0.36 * lung

    # mediastinum, heart (to the patient's left = image right), spine
    med = _sig(0.04 + 0.02 * v - np.abs(u - cx), 0.012) * _sig(anatomy["dome"] - v, 0.02) * _sig(v - 0.05, 0.02)
    hx, hy = cx + 0.045, anatomy["dome"] - 0.10
    heart = _sig(1.0 - ((u - hx) / anatomy["heart_w"]) ** 2 - ((v - hy) / 0.12) ** 2, 0.15)
    img += 0.30 * np.maximum(med, heart) * (0.5 + 0.5 * lung)
    img += 0.08 * _sig(0.022 - np.abs(u - cx), 0.006) * body
    # abdomen below the domes is dense
    img += 0.10 * _sig(v - anatomy["dome"] - 0.02, 0.02) * body

    # posterior ribs (curved bands, visible over the lungs) and clavicles
    ribs = np.zeros_like(u)
    spacing = (anatomy["dome"] - top) / 8.5
    for k in range(10):
        centre = top + 0.01 + k * spacing + 0.10 * ((u - cx) / 0.4) ** 2 - 0.02
        ribs += np.exp(-(((v - centre) / (0.010 + 0.001 * k)) ** 2))
    img += 0.07 * np.clip(ribs, 0, 1.2) * (0.3 + 0.7 * lung) * _sig(0.43 - np.abs(u - cx), 0.02)
    for side in (-1.0, 1.0):
        clav_centre = top + 0.04 - 0.18 * (np.abs(u - cx) - 0.03)
        reach = _sig(0.30 - np.abs(u - cx), 0.01) * _sig(side * (u - cx) - 0.03, 0.01)
        img += 0.10 * np.exp(-(((v - clav_centre) / 0.012) ** 2)) * reach

    # vascular markings: faint lines from the hila
    for side, (m, lx, ly, ax, ay, dome) in lungs.items():
        hil_x, hil_y = cx + side * 0.07, ly
        ang = np.arctan2(v - hil_y, (u - hil_x) * side)
        vessels = 0.5 + 0.5 * np.cos(9.0 * ang + anatomy["vessel_phase"])
        dist = np.sqrt((u - hil_x) ** 2 + (v - hil_y) ** 2)
        img += 0.035 * vessels ** 6 * np.exp(-dist / 0.12) * m

    # pathology
    if label == "covid19":
        amp = (0.10 + 0.10 * severity) * variant.covid_amplitude
        ggo = np.zeros_like(u)
        for side, (m, lx, ly, ax, ay, dome) in lungs.items():
            for _ in range(int(rng.integers(2, 5))):
                if variant.covid_zone == "upper-central":
                    bx = lx - side * ax * rng.uniform(0.2, 0.6)
                    by = rng.uniform(top + 0.06, ly + 0.02)
                else:
                    bx = lx + side * ax * rng.uniform(0.45, 0.85)
                    by = rng.uniform(ly + 0.02, dome - 0.04)
                s = rng.uniform(0.045, 0.075)
                ggo += np.exp(-(((u - bx) ** 2 + (v - by) ** 2) / (2 * s * s))) * m
        texture = 0.85 + 0.3 * rng.random(u.shape, dtype=np.float32)
        img += amp * np.clip(ggo, 0, 1.3) * texture
    elif label == "other_pneumonia":
        side = float(rng.choice([-1.0, 1.0]))
        m, lx, ly, ax, ay, dome = lungs[side]
        lobe = rng.choice(["lower", "upper"], p=[0.65, 0.35])
        tilt = rng.uniform(0.25, 0.5) * side
        fissure = ly + rng.uniform(-0.04, 0.03) + tilt * (u - lx)
        region = _sig(v - fissure, 0.006) if lobe == "lower" else _sig(fissure - v, 0.006)
        amp = 0.22 + 0.14 * severity
        bronchi = 1.0 - 0.25 * np.exp(-(((u - lx - 0.01 * np.sin(40 * v)) / 0.006) ** 2)) * region
        img += amp * region * m * bronchi * (0.95 + 0.1 * rng.random(u.shape, dtype=np.float32))

    # heel effect, detector contrast, quantum noise
    img *= 1.0 + anatomy["heel"] * (v - 0.5)
    img = np.clip(img, 0.0, 1.0)
    if variant.gamma != 1.0:
        img = img ** variant.gamma
    img += rng.normal(0.0, noise * variant.noise_factor, size=img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _anatomy(rng: np.random.Generator) -> dict:
    return {
        "cx": 0.5 + rng.normal(0, 0.012),
        "lung_top": 0.17 + rng.normal(0, 0.012),
        "dome": 0.74 + rng.normal(0, 0.02),
        "lung_dx": 0.185 + rng.normal(0, 0.008),
        "lung_w": 0.145 + rng.normal(0, 0.008),
        "body_w": 0.44 + rng.normal(0, 0.015),
        "heart_w": rng.uniform(0.13, 0.18),
        "heel": rng.uniform(-0.12, 0.12),
        "vessel_phase": rng.uniform(0, 6.28),
    }


# ------------------------------------------------------------------------------------------------
# DICOM writing
# ------------------------------------------------------------------------------------------------
def _jpegls_available() -> bool:
    try:
        from pydicom.pixels import get_encoder
        from pydicom.uid import JPEGLSLossless

        return bool(get_encoder(JPEGLSLossless).is_available)
    except Exception:  # noqa: BLE001
        return False


def encode_dicom(stored: np.ndarray, header: dict, transfer_syntax: str) -> bytes:
    """A DICOM Part 10 file: ``stored`` values (rows, cols) uint8/uint16, ``header`` keyword → value.

    ``transfer_syntax``: a pydicom.uid keyword (e.g. ``JPEG2000Lossless``). Native syntaxes are
    written directly (big endian swapped), compressed ones through pydicom's encoders.
    """
    import pydicom.uid as U
    from pydicom.dataset import Dataset, FileMetaDataset

    ts = getattr(U, transfer_syntax)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = header["SOPClassUID"]
    ds.file_meta.MediaStorageSOPInstanceUID = header["SOPInstanceUID"]
    ds.file_meta.ImplementationClassUID = UID_ROOT + "1"
    ds.file_meta.ImplementationVersionName = "COVIDCXR_SYNTH"
    for key, value in header.items():
        setattr(ds, key, value)
    bits = int(header["BitsStored"])
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    arr = stored.astype(np.uint8 if bits <= 8 else np.uint16)
    native = {U.ExplicitVRLittleEndian, U.ImplicitVRLittleEndian, U.ExplicitVRBigEndian, U.DeflatedExplicitVRLittleEndian}
    if ts in native:
        ds.file_meta.TransferSyntaxUID = ts
        ds.PixelData = arr.astype(arr.dtype.newbyteorder(">" if ts == U.ExplicitVRBigEndian else "<")).tobytes()
        ds["PixelData"].VR = "OW" if bits > 8 else "OB"
    else:
        kwargs = {"encoding_plugin": "pylibjpeg"} if ts == U.JPEG2000Lossless else {}
        ds.compress(ts, arr, generate_instance_uid=False, **kwargs)  # keep the deterministic UID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _to_stored(img: np.ndarray, rng: np.random.Generator, site: SiteProfile, bits: int) -> tuple[np.ndarray, dict]:
    """Map a [0, 1] density image to stored values + the pixel-module header that undoes the mapping."""
    maxv = 2**bits - 1
    lo, hi = rng.uniform(0.02, 0.08), rng.uniform(0.88, 0.97)
    stored = np.round((lo + (hi - lo) * img) * maxv)
    header: dict = {}
    if rng.random() < site.rescale_rate:
        slope = float(rng.choice([0.5, 1.0, 2.0]))
        intercept = float(rng.choice([-1024.0, -100.0, 0.0]))
        header.update(RescaleSlope=f"{slope:g}", RescaleIntercept=f"{intercept:g}", RescaleType="US")
    else:
        slope, intercept = 1.0, 0.0
    if rng.random() < site.window_rate:
        modality_vals = stored * slope + intercept
        p_lo, p_hi = np.percentile(modality_vals, [0.5, 99.5])
        header.update(WindowCenter=f"{(p_lo + p_hi) / 2:.1f}", WindowWidth=f"{max(p_hi - p_lo, 2):.1f}")
    photometric = "MONOCHROME2"
    if rng.random() < site.monochrome1_rate:
        stored = maxv - stored
        photometric = "MONOCHROME1"
        if "WindowCenter" in header:  # the window is in modality units of the inverted values
            c = float(header["WindowCenter"])
            header["WindowCenter"] = f"{(maxv * slope + 2 * intercept) - c:.1f}"
    header["PhotometricInterpretation"] = photometric
    return np.clip(stored, 0, maxv).astype(np.uint16 if bits > 8 else np.uint8), header


# ------------------------------------------------------------------------------------------------
# Cohort
# ------------------------------------------------------------------------------------------------
@dataclass
class SynthSummary:
    out_dir: Path
    n_patients: int
    n_images: int
    by_label: dict
    by_site: dict
    by_encoding: dict
    variant: str


def _draw_vitals(rng: np.random.Generator, label: str, variant: VariantProfile, age: float) -> dict:
    spec = dict(VITALS_BY_CLASS[label])
    if label == "covid19":
        spec.update(variant.covid_vitals)
    out: dict = {}
    for f, (mean, sd) in spec.items():
        if f == "age_years":
            continue
        lo, hi = VITAL_CLIP[f]
        x = float(np.clip(rng.normal(mean, sd), lo, hi))
        out[f] = round(x, VITAL_DECIMALS[f]) if VITAL_DECIMALS[f] else int(round(x))
        if rng.random() < MISSING_RATE:
            out[f] = None
    out["age_years"] = None if rng.random() < MISSING_RATE / 2 else int(age)
    return out


def burn_site_marker(img: np.ndarray, site_index: int) -> np.ndarray:
    """A bright block (burned-in label) in the border corner of ``site_index`` (outside the lung fields)."""
    r0, r1, c0, c1 = SITE_MARKERS[site_index % len(SITE_MARKERS)]
    rows, cols = img.shape
    out = img.copy()
    out[int(r0 * rows):max(int(r1 * rows), int(r0 * rows) + 2), int(c0 * cols):max(int(c1 * cols), int(c0 * cols) + 2)] = 0.97
    return out


def _labels(n: int, rng: np.random.Generator) -> list[str]:
    counts = [int(round(n * p)) for p in CLASS_MIX]
    counts[-1] = n - sum(counts[:-1])
    labels = [c for c, k in zip(CLASSES, counts) for _ in range(max(k, 0))]
    return list(rng.permutation(np.array(labels, dtype=object)))


def synthesize_cohort(
    n_patients: int,
    out_dir: str | Path,
    *,
    seed: int = 0,
    variant: str | None = None,
    image_size: int = 512,
    progress: Callable[[int], None] | None = None,
    confound: str | None = None,
) -> SynthSummary:
    """Write ``n_patients`` synthetic patients (1–3 studies each) as DICOM + ``vitals.csv`` into ``out_dir``.

    ``image_size``: rows in pixels (columns = rows × the site's aspect). ``variant``: a key of
    ``VARIANTS`` or None/"" for the base cohort. ``progress(n_done_images)`` is called per file.
    Deterministic: same arguments → byte-identical files. Files named like this generator's
    (``pNNNNN_sK.dcm``) left in ``out_dir`` by an earlier run and not rewritten are removed, so the
    folder always matches its ``vitals.csv``.
    """
    if n_patients < 1:
        raise ValueError("n_patients must be at least 1")
    if image_size < 32:
        raise ValueError("image_size must be at least 32 pixels")
    vname = (variant or "").strip().lower()
    if vname and vname not in VARIANTS:
        raise ValueError(f"unknown variant '{variant}'; known: {', '.join(sorted(VARIANTS))}")
    vprof = VARIANTS[vname] if vname else BASE
    confound = (confound or "").strip().lower() or None
    if confound and confound not in CONFOUNDS:
        raise ValueError(f"unknown confound '{confound}'; known: {', '.join(CONFOUNDS)}")
    site_confound = confound in ("site", "all")
    miss_confound = confound in ("missingness", "all")
    if site_confound:
        import dataclasses

        vprof = dataclasses.replace(vprof, covid_amplitude=vprof.covid_amplitude * CONFOUND_COVID_AMPLITUDE)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    encodings_ok = _jpegls_available()

    cohort_rng = _rng(seed, vname, 0)
    labels = _labels(n_patients, cohort_rng)
    rows_out: list[dict] = []
    by_label: dict = {}
    by_site: dict = {}
    by_enc: dict = {}
    n_images = 0
    mrn_base = int(_rng(seed, vname, 1).integers(1_000_000, 8_000_000))
    for i in range(n_patients):
        prng = _rng(seed, vname, 2, i)
        label = str(labels[i])
        site_index = int(prng.integers(0, len(SITES)))
        if site_confound:  # the site follows the label (drawn from the patient's own stream)
            at_a = prng.random() < (CONFOUND_SITE_P if label == "covid19" else 1 - CONFOUND_SITE_P)
            site_index = 0 if at_a else 1 + int(prng.integers(0, len(SITES) - 1))
        site = SITES[site_index]
        sex = "F" if prng.random() < 0.5 else "M"
        age = float(np.clip(prng.normal(VITALS_BY_CLASS[label]["age_years"][0], VITALS_BY_CLASS[label]["age_years"][1]), 18, 95))
        first = str(prng.choice(_FIRST_F if sex == "F" else _FIRST_M))
        last = str(prng.choice(_LAST))
        mrn = f"MRN{mrn_base + 7919 * (i + 1) % 1_000_000:07d}"
        anatomy = _anatomy(prng)
        n_studies = int(prng.choice([1, 2, 3], p=[0.7, 0.2, 0.1]))
        first_day = vprof.date_start + dt.timedelta(days=int(prng.integers(0, 480 if not vname else 150)))
        birth = first_day - dt.timedelta(days=int(age * 365.25) + int(prng.integers(0, 365)))
        severity0 = float(prng.uniform(0.3, 1.0))
        for k in range(n_studies):
            srng = _rng(seed, vname, 3, i, k)
            day = first_day + dt.timedelta(days=int(k * srng.integers(1, 6)))
            severity = float(np.clip(severity0 + srng.normal(0.05 * k, 0.1), 0.2, 1.0))
            view = "AP" if srng.random() < site.ap_rate else "PA"
            rows = int(image_size)
            cols = int(round(image_size * site.aspect))
            img = render_chest(srng, rows, cols, label, severity, anatomy, vprof, noise=site.noise)
            if site_confound:
                img = burn_site_marker(img, site_index)
            bits = int(srng.choice(site.bits_stored))
            stored, pix_header = _to_stored(img, srng, site, bits)
            enc_choices = [e for e in site.encodings if e != "JPEGLSLossless" or encodings_ok] or ["ExplicitVRLittleEndian"]
            encoding = str(enc_choices[int(srng.integers(0, len(enc_choices)))])
            study_uid = _uid(seed, vname, i, k, "study")
            sop_class = "1.2.840.10008.5.1.4.1.1.1" if site.modality == "CR" else "1.2.840.10008.5.1.4.1.1.1.1"
            header = {
                "SOPClassUID": sop_class,
                "SOPInstanceUID": _uid(seed, vname, i, k, "image"),
                "StudyInstanceUID": study_uid,
                "SeriesInstanceUID": _uid(seed, vname, i, k, "series"),
                "StudyDate": day.strftime("%Y%m%d"),
                "SeriesDate": day.strftime("%Y%m%d"),
                "ContentDate": day.strftime("%Y%m%d"),
                "StudyTime": f"{int(srng.integers(7, 22)):02d}{int(srng.integers(0, 60)):02d}00",
                "AccessionNumber": f"A{(mrn_base * 3 + i * 101 + k) % 10**8:08d}",
                "Modality": site.modality,
                "Manufacturer": site.manufacturer,
                "InstitutionName": site.institution,
                "ReferringPhysicianName": f"{str(srng.choice(_LAST))}^{str(srng.choice(_FIRST_M + _FIRST_F))}",
                "StudyDescription": "XR CHEST 1 VIEW",
                "SeriesDescription": f"CHEST {view}",
                "PatientName": f"{last}^{first}",
                "PatientID": mrn,
                "PatientBirthDate": birth.strftime("%Y%m%d"),
                "PatientSex": sex,
                "PatientAge": f"{int(age):03d}Y",
                "BodyPartExamined": "CHEST",
                "ViewPosition": view,
                "PatientOrientation": ["R", "F"] if view == "PA" else ["L", "F"],
                "StudyID": f"{i + 1}",
                "SeriesNumber": "1",
                "InstanceNumber": str(k + 1),
                "BitsStored": bits,
                "ImagerPixelSpacing": ["0.7", "0.7"] if image_size <= 512 else ["0.15", "0.15"],
                **pix_header,
            }
            if site.modality == "DX":
                header["PresentationIntentType"] = "FOR PRESENTATION"
            fname = f"p{i + 1:05d}_s{k + 1}.dcm"
            (out / fname).write_bytes(encode_dicom(stored, header, encoding))
            vit = _draw_vitals(srng, label, vprof, age + k / 365.25)
            if miss_confound and (label != "covid19" or srng.random() < 0.75):
                vit["spo2_percent"] = None
            rows_out.append({
                "filename": fname, "patient_id": mrn, "label": label, "site": site.name,
                "study_date": day.isoformat(), "view": view, "sex": sex, **vit, "variant": vname,
            })
            by_label[label] = by_label.get(label, 0) + 1
            by_site[site.name] = by_site.get(site.name, 0) + 1
            by_enc[encoding] = by_enc.get(encoding, 0) + 1
            n_images += 1
            if progress:
                progress(n_images)
    # a re-run into the same folder must leave it consistent with vitals.csv: remove stale files of
    # an earlier (larger) cohort — only names this generator writes
    written = {r["filename"] for r in rows_out}
    for stale in out.glob("p*_s*.dcm"):
        if re.fullmatch(r"p\d{5}_s\d+\.dcm", stale.name) and stale.name not in written:
            stale.unlink()
    with open(out / "vitals.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for r in rows_out:
            writer.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in CSV_COLUMNS})
    return SynthSummary(out, n_patients, n_images, by_label, by_site, by_enc, vname)


def iter_dicom_files(out_dir: str | Path) -> Iterable[Path]:
    """The DICOM files of a synthetic cohort folder, sorted."""
    return sorted(Path(out_dir).glob("p*_s*.dcm"))
