"""The one preprocessing path for ingest, training and serving (docs/INTERFACES.md).

Images
------
``decode_dicom`` reads a DICOM Part 10 file (bytes, path or binary stream) and returns a
``DecodedImage`` whose ``pixels`` are float32 (H, W) in [0, 1], MONOCHROME2 convention
(bright = dense), after the Modality LUT / rescale and the VOI LUT / window. It enforces the
image-input contract of ARCHITECTURE.md and refuses everything else with ``ImageRefused(code,
reason)``; no other exception escapes it.

Order of checks (all on the header, *before* any pixel decoding):

1. readable DICOM Part 10 (``dcmread(force=False)``)            → ``not-dicom`` / ``truncated``
2. Modality CR or DX (or, when Modality is absent, a CR/DX SOP Class) → ``wrong-modality``
3. BodyPartExamined CHEST (THORAX, LUNG accepted) or missing       → ``not-chest``
4. ViewPosition PA / AP; missing → warning; LL/RL/LATERAL …       → ``lateral-view``; other → ``not-frontal``
5. SamplesPerPixel 1 and PhotometricInterpretation MONOCHROME1/2  → ``colour-image``
6. NumberOfFrames ≤ 1                                            → ``multi-frame``
7. Pixel Data present                                            → ``no-pixel-data``
8. BitsAllocated 8/16, BitsStored 8–16                           → ``bits-stored``
9. Rows × Columns ≤ ``max_pixels`` (decompression-bomb guard)    → ``too-many-pixels``

Bounded decompression (``decompression-bomb``): nothing is inflated beyond what the header allows.
A Deflated Explicit VR Little Endian file is *not* handed to ``dcmread`` (which inflates the whole
data set at once, unbounded): the data set is inflated incrementally, first only up to the Pixel
Data element (at most ``HEADER_INFLATE_LIMIT``), the header checks above run on that, and only then
is the rest inflated, at most Rows × Columns × SamplesPerPixel × BitsAllocated/8 plus
``INFLATE_SLACK`` bytes. Encapsulated (compressed) frames are checked before any decoder sees them:
the codestream's own dimensions (JPEG / JPEG-LS SOF, JPEG 2000 SIZ) may not exceed the header's,
and each RLE segment's decoded length (counted from its run headers, nothing decoded) may not
exceed Rows × Columns.

Refusal codes (``ImageRefused.code``): ``wrong-modality``, ``not-chest``, ``lateral-view``,
``not-frontal``, ``colour-image``, ``multi-frame``, ``no-pixel-data``, ``bits-stored``,
``too-many-pixels``, ``decompression-bomb``, ``not-dicom``, ``truncated``, ``undecodable``; for paths also ``not-found``,
``not-a-file``, ``unreadable``; ``load_png`` adds ``not-image``.

Then pixels are decoded through pydicom's ``pixel_array``, which tries every installed decoder plugin
in turn (python-gdcm, pylibjpeg, pyjpegls, Pillow, pydicom's own): where pylibjpeg fails (e.g. some
12-bit JPEG Extended files) python-gdcm is the second decoder; when all fail → ``undecodable``
naming the transfer syntax. A short native Pixel Data element → ``truncated``.

Intensity mapping: Modality LUT or RescaleSlope/Intercept (``apply_modality_lut``), then the first
VOI LUT or window (``apply_voi_lut``), scaled to [0, 1] by the window's own output range; without a
VOI transform the image is min–max scaled. MONOCHROME1 is inverted last (``1 - x``).

Reduced-resolution decoding (JPEG 2000; ``decode_dicom(target_size=N)``, ``decode_and_prepare``)
-----------------------------------------------------------------------------------------------
The model sees an N x N image (``cache_image_size``, 256). For JPEG 2000 (1.2.840.10008.1.2.4.90
lossless, .91 lossy) the wavelet pyramid lets OpenJPEG (through Pillow, ``models.j2k``) decode a
lower resolution level directly: the largest level ``k`` whose sides are both ≥ N
(× ``REDUCED_DECODE_OVERSAMPLE``) is decoded, then the usual ``prepare_image`` resize, its source box
shifted by (1 - 2**-k)/2 reduced pixels because the wavelet low-pass centres reduced pixel n on
full-resolution pixel 2**k·n (``prepare_image(decoded, N)`` does it from ``decoded.reduction``). Every header
check above runs first, unchanged; the same Modality LUT/rescale, VOI LUT/window and MONOCHROME1
inversion are applied to the reduced stored values. Without a VOI LUT or window the min–max scaling
reads its extremes on the reduced level, which differ from the full resolution's (the low-pass
softens single-pixel extremes); ``prepare_image`` ends with ``models.intensity.robust_window``,
which is invariant to that affine difference, so the prepared arrays still agree (measured on the
fidelity phantoms, with a burned-in full-white marker and hot pixels too: PSNR 52–67 dB, P(covid19)
within 0.006). Where the robust window would not rescale (an image with almost no contrast, whose
gain the min–max alone sets) the full decode runs instead (``_minmax_gain_divided_out``). Anything
unexpected (codestream disagreeing with the header, a level Pillow cannot size, a decoder error, a
failing VOI transform) falls back to the full decode. HTJ2K is not reduced (untested here: no encoder).
``DecodedImage.reduction`` (and ``dicom_meta["decode_reduction"]``) says which path ran.

Who uses which path: serving (the API) should call ``decode_dicom(..., target_size=N)`` or
``decode_and_prepare``; the import (``pipelines.ingest``) decodes at full resolution on purpose:
its content hash (dedupe across batches, the cached array's file name) and the manifest's original
height/width are defined on the full-resolution pixels, and import is offline batch work. The two
prepared arrays agree within the fidelity tolerance (tests/test_reduced_decode.py: PSNR ≥ 40 dB,
P(covid19) within 0.02).

PNG/JPEG files of the public collection are read with ``load_png`` (Pillow; no header: the
metadata come from the collection's CSV).

Vitals
------
``parse_vitals`` validates one mapping of vitals (see ``VITAL_RANGES`` for units and ranges).
Temperature convention: ``temperature_c`` is °C. °F is accepted only when the unit says so:
either the key ``temperature_f`` or a structured value ``{"value": 101.3, "unit": "F"}`` (units
``C``/``°C``/``Cel`` or ``F``/``°F``/``[degF]``) under ``temperature_c``/``temperature``. The public
collection's ``pO2_saturation`` is an alias of ``spo2_percent``; ``temperature`` (bare, °C) and
``age`` are aliases too. Out-of-range values raise ``VitalsError``; nothing is ever clipped.
"""
from __future__ import annotations

import io
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Mapping

import numpy as np

__all__ = [
    "ImageRefused",
    "DecodedImage",
    "decode_dicom",
    "load_png",
    "prepare_image",
    "decode_and_prepare",
    "REDUCED_DECODE_OVERSAMPLE",
    "VITAL_FIELDS",
    "VITAL_RANGES",
    "VITAL_UNITS",
    "SEX_VALUES",
    "VitalsError",
    "parse_vitals",
    "vitals_warnings",
]

# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------
CR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
DX_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1.1": "DX",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX",  # Digital X-Ray Image Storage - For Processing
}
ACCEPTED_MODALITIES = ("CR", "DX")
CHEST_BODY_PARTS = {"CHEST", "THORAX", "LUNG", "TORAX", "THORAX CHEST"}
FRONTAL_VIEWS = {"PA", "AP"}
LATERAL_VIEWS = {"LL", "RL", "LATERAL", "LAT", "LLAT", "RLAT", "L", "R", "RLD", "LLD"}
MONOCHROME = {"MONOCHROME1", "MONOCHROME2"}


_FATAL = (KeyboardInterrupt, SystemExit, GeneratorExit)
_log = logging.getLogger("cxr.preprocessing")

# Reduced JPEG 2000 decoding keeps sides ≥ this many times the target side; the usual resize (with
# the half-pixel alignment of ``prepare_image``) does the rest. Measured on 2048² 12/16-bit chest
# phantoms with a window, prepared 256² against full decode + the same resize: k=3 (256²) 56–57 dB,
# k=2 (512², oversample 2) 60–64 dB; without the alignment 38 dB and 45.6 dB. 1 = the rule
# "the largest reduction that still leaves at least the model's input size".
REDUCED_DECODE_OVERSAMPLE = 1


class ImageRefused(ValueError):
    """An image the system will not use. ``code``: short kebab id; ``reason``: what was found and what is expected."""

    def __init__(self, code: str, reason: str):
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


@dataclass
class DecodedImage:
    """A decoded frontal chest radiograph.

    ``pixels``: float32 (H, W) in [0, 1], MONOCHROME2 convention (bright = dense), after Modality
    LUT/rescale and VOI LUT/window. ``shape`` = (H, W) of ``pixels``: the full Rows x Columns, or a
    reduced JPEG 2000 resolution level when ``reduction`` > 0 (``decode_dicom(target_size=...)``; the
    full size stays in ``dicom_meta["rows"/"columns"]``). ``dicom_meta`` holds non-PHI
    technical fields only; ``patient`` holds identifying header fields (name, ids, dates) for the
    ingest's de-identification step only — never log it, never store it (it is left out of repr).
    """

    pixels: np.ndarray
    modality: str | None
    view: str | None
    photometric: str
    transfer_syntax: str | None
    bits_stored: int
    shape: tuple[int, int]
    warnings: list[str] = field(default_factory=list)
    dicom_meta: dict[str, Any] = field(default_factory=dict)
    patient: dict[str, Any] = field(default_factory=dict, repr=False)
    reduction: int = 0  # JPEG 2000 resolution levels discarded: pixels are ~ (rows / 2**k, cols / 2**k)


def _show(value: str | None, limit: int = 24) -> str:
    """A header value quoted in a refusal reason: printable ASCII only, at most ``limit`` characters."""
    text = "".join(ch for ch in str(value) if 32 <= ord(ch) < 127)
    return text[:limit] + ("…" if len(text) > limit else "")


def _str(ds, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _int(ds, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _floats(value: Any) -> list[float] | None:
    """A multi-valued numeric header value as floats; None when absent or malformed (metadata only)."""
    if value is None or value == "":
        return None
    try:
        items = list(value) if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") and not isinstance(value, str) else [value]
        return [float(v) for v in items]
    except (TypeError, ValueError):
        return None


def _read_source(source: Any) -> bytes:
    """Bytes of a path / bytes / binary stream; I/O problems become ImageRefused."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            if path.is_dir():
                raise ImageRefused("not-a-file", f"'{path.name}' is a directory; expected a DICOM file")
            return path.read_bytes()
        except ImageRefused:
            raise
        except FileNotFoundError:
            raise ImageRefused("not-found", f"file '{path.name}' does not exist") from None
        except PermissionError:
            raise ImageRefused("unreadable", f"file '{path.name}' cannot be read (permission denied)") from None
        except OSError as exc:
            raise ImageRefused("unreadable", f"file '{path.name}' cannot be read ({exc.strerror or type(exc).__name__})") from None
    if hasattr(source, "read"):
        try:
            data = source.read()
        except Exception as exc:  # noqa: BLE001 - a broken stream is a refusal, not a crash
            raise ImageRefused("unreadable", f"the stream cannot be read ({type(exc).__name__})") from None
        if not isinstance(data, (bytes, bytearray)):
            raise ImageRefused("unreadable", "the stream did not return bytes; expected a binary file")
        return bytes(data)
    raise ImageRefused("unreadable", f"unsupported source type {type(source).__name__}; expected bytes, a path or a binary stream")


def _default_max_pixels() -> int:
    try:
        from core.config import get_settings

        return int(get_settings().max_image_pixels)
    except Exception:  # noqa: BLE001 - settings unavailable: the documented default
        return 40_000_000


def decode_dicom(source: bytes | str | os.PathLike | BinaryIO, *, max_pixels: int | None = None,
                 target_size: int | None = None) -> DecodedImage:
    """Decode one DICOM chest radiograph; refuse anything outside the image-input contract.

    ``source``: the file's bytes, a path, or a binary stream. ``max_pixels``: largest Rows×Columns
    accepted (default ``get_settings().max_image_pixels``); checked on the header before decoding.
    ``target_size``: side (pixels) of the square the caller will resize to (``prepare_image``); when
    given, a JPEG 2000 image may be decoded at a reduced wavelet resolution level
    whose sides are both ≥ ``REDUCED_DECODE_OVERSAMPLE * target_size`` (see "Reduced-resolution
    decoding" in the module docstring); None (default): always the full resolution.
    Returns ``DecodedImage`` (pixels float32 (H, W) in [0, 1], MONOCHROME2 convention).
    Raises ``ImageRefused`` only — any unexpected failure is wrapped into one.
    """
    try:
        return _decode_dicom(source, max_pixels=max_pixels, target_size=target_size)
    except ImageRefused:
        raise
    except MemoryError:
        raise ImageRefused("too-many-pixels", "not enough memory to decode the image") from None
    except _FATAL:
        raise
    except BaseException as exc:  # noqa: BLE001 - never let a decoder bug (or a Rust panic) escape as a traceback
        # only the exception type: messages may quote header values (identifiers)
        raise ImageRefused("undecodable", f"the file could not be decoded ({type(exc).__name__}); expected a valid DICOM image") from None


def _decode_dicom(source: Any, *, max_pixels: int | None, target_size: int | None = None) -> DecodedImage:
    import warnings as _w

    import pydicom
    from pydicom.errors import InvalidDicomError

    data = _read_source(source)
    if max_pixels is None:
        max_pixels = _default_max_pixels()
    if len(data) == 0:
        raise ImageRefused("not-dicom", "the file is empty; expected a DICOM Part 10 file")
    deflated = _DeflatedDataSet.open(data)  # None unless the transfer syntax is Deflated
    try:
        with _w.catch_warnings(record=True) as read_warnings:
            _w.simplefilter("always")
            # deflated: only the header (up to Pixel Data) is inflated here, bounded
            ds = deflated.header() if deflated is not None else pydicom.dcmread(io.BytesIO(data), force=False)
    except InvalidDicomError:
        raise ImageRefused(
            "not-dicom", "no DICOM Part 10 header (128-byte preamble + 'DICM') found; expected a DICOM file"
        ) from None
    except ImageRefused:
        raise
    except (EOFError, OSError) as exc:
        raise ImageRefused("truncated", f"the DICOM file ends unexpectedly ({type(exc).__name__}); expected a complete file") from None
    except Exception as exc:  # noqa: BLE001
        raise ImageRefused("not-dicom", f"the DICOM header cannot be parsed ({type(exc).__name__}); expected a valid DICOM file") from None

    _check_complete(ds, [str(w.message) for w in read_warnings])

    warnings: list[str] = []
    meta = getattr(ds, "file_meta", None)
    ts_uid = None if meta is None else meta.get("TransferSyntaxUID")
    ts_name = None if ts_uid is None else (ts_uid.name if hasattr(ts_uid, "name") else str(ts_uid))

    # 2. modality (DX also via SOP Class)
    modality = (_str(ds, "Modality") or "").upper() or None
    sop_class = _str(ds, "SOPClassUID") or (None if meta is None else (str(meta.get("MediaStorageSOPClassUID") or "") or None))
    if modality is None:
        if sop_class in DX_SOP_CLASSES:
            modality = "DX"
            warnings.append("Modality missing: DX taken from the SOP Class UID")
        elif sop_class == CR_SOP_CLASS:
            modality = "CR"
            warnings.append("Modality missing: CR taken from the SOP Class UID")
    if modality not in ACCEPTED_MODALITIES:
        found = modality or "no Modality and no radiography SOP Class"
        raise ImageRefused("wrong-modality", f"modality is {_show(found, 48)}; expected a chest radiograph (CR or DX)")

    # 3. body part
    body_part = (_str(ds, "BodyPartExamined") or "").upper() or None
    if body_part is not None and body_part not in CHEST_BODY_PARTS:
        raise ImageRefused("not-chest", f"BodyPartExamined is {_show(body_part)}; expected CHEST (or missing)")

    # 4. view
    view_raw = (_str(ds, "ViewPosition") or "").upper() or None
    if view_raw is None:
        view = None
        warnings.append("ViewPosition missing: assumed frontal (PA/AP); please check the view")
    elif view_raw in FRONTAL_VIEWS:
        view = view_raw
    elif view_raw in LATERAL_VIEWS or "LAT" in view_raw:
        raise ImageRefused("lateral-view", f"ViewPosition is {_show(view_raw)} (lateral); expected a frontal view (PA or AP)")
    else:
        raise ImageRefused("not-frontal", f"ViewPosition is {_show(view_raw)}; expected a frontal view (PA or AP)")

    # 5. colour
    photometric = (_str(ds, "PhotometricInterpretation") or "").upper() or None
    samples = _int(ds, "SamplesPerPixel") or 1
    if samples != 1 or (photometric is not None and photometric not in MONOCHROME):
        raise ImageRefused(
            "colour-image",
            f"PhotometricInterpretation is {_show(photometric or 'missing')} with {samples} sample(s) per pixel; "
            "expected grayscale (MONOCHROME1 or MONOCHROME2)",
        )
    if photometric is None:
        photometric = "MONOCHROME2"
        warnings.append("PhotometricInterpretation missing: MONOCHROME2 assumed")

    # 6. frames
    frames = _int(ds, "NumberOfFrames") or 1
    if frames > 1:
        raise ImageRefused("multi-frame", f"the image has {frames} frames; expected a single-frame radiograph")

    # 7. pixel data
    if "PixelData" not in ds and not (deflated is not None and deflated.pixel_data_seen):
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        found = f"only {other[0]}" if other else "no Pixel Data element"
        raise ImageRefused("no-pixel-data", f"the file has {found}; expected an image with Pixel Data")

    # 8. bit depth
    bits_alloc = _int(ds, "BitsAllocated")
    bits_stored = _int(ds, "BitsStored") or bits_alloc
    if bits_alloc not in (8, 16) or bits_stored is None or not (8 <= bits_stored <= 16) or bits_stored > bits_alloc:
        raise ImageRefused(
            "bits-stored", f"BitsAllocated {bits_alloc}, BitsStored {bits_stored}; expected BitsStored 8–16 in 8- or 16-bit words"
        )

    # 9. size guard, before any decoding
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if not rows or not cols or rows < 0 or cols < 0:
        raise ImageRefused("undecodable", f"Rows/Columns are {rows}/{cols}; expected positive image dimensions")
    if rows * cols > max_pixels:
        raise ImageRefused(
            "too-many-pixels", f"the header declares {rows} x {cols} = {rows * cols} pixels; the limit is {max_pixels}"
        )

    # 10. bounded decompression: inflate / decode no more than the header allows
    if deflated is not None:
        with _w.catch_warnings(record=True) as read_warnings:
            _w.simplefilter("always")
            ds = deflated.full(rows * cols * samples * (bits_alloc // 8), rows, cols, bits_alloc)
        _check_complete(ds, [str(w.message) for w in read_warnings])
    elif ts_uid is not None and getattr(ts_uid, "is_compressed", False):
        _check_encapsulated(ds, str(ts_uid), rows, cols, samples, bits_alloc)

    pixels = voi_note = None
    reduction = 0
    if target_size is not None:
        reduced = _decode_reduced(ds, ts_uid, rows, cols, bits_stored, target_size)
        if reduced is not None:
            arr, reduction = reduced
            # min-max scaling (no VOI): its stored-value span at this level, for the gain check below
            reduced_span = None if _has_voi(ds) else float(arr.max()) - float(arr.min())
            pixels, voi_note = _to_unit_range(arr, ds, photometric)
            del arr
            if voi_note is not None:  # the VOI transform failed: min-max needs the full-resolution extremes
                pixels, reduction = None, 0
            elif reduced_span is not None and not _minmax_gain_divided_out(pixels, reduced_span, ds, bits_stored):
                pixels, reduction = None, 0
    if pixels is None:
        arr = _decode_pixels(ds, ts_uid, ts_name, rows, cols, bits_alloc)
        pixels, voi_note = _to_unit_range(arr, ds, photometric)
        del arr
    if voi_note:
        warnings.append(voi_note)

    spacing = _floats(ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing"))
    dicom_meta = {
        "modality": modality,
        "sop_class_uid": sop_class,
        "transfer_syntax_uid": None if ts_uid is None else str(ts_uid),
        "rows": rows,
        "columns": cols,
        "bits_allocated": bits_alloc,
        "bits_stored": bits_stored,
        "pixel_representation": _int(ds, "PixelRepresentation") or 0,
        "photometric": photometric,
        "view_position": view,
        "body_part": body_part,
        "pixel_spacing_mm": spacing,
        "manufacturer": _str(ds, "Manufacturer"),
        "rescale": _floats([ds.get("RescaleSlope", 1) or 1, ds.get("RescaleIntercept", 0) or 0]),
        "has_window": "WindowCenter" in ds and "WindowWidth" in ds,
        "has_voi_lut": "VOILUTSequence" in ds,
        "decode_reduction": reduction,
        "patient_sex": _str(ds, "PatientSex"),
        "patient_age": _str(ds, "PatientAge"),
        # the flag only (the free-text fields it comes from are never kept); read from this one
        # decoded header, so no caller parses (or inflates) the file a second time for it
        "supine": any("SUPINE" in (_str(ds, t) or "").upper() for t in SUPINE_TAGS),
    }
    patient = {
        "patient_id": _str(ds, "PatientID"),
        "patient_name": _str(ds, "PatientName"),
        "patient_birth_date": _str(ds, "PatientBirthDate"),
        "patient_sex": _str(ds, "PatientSex"),
        "patient_age": _str(ds, "PatientAge"),
        "study_date": _str(ds, "StudyDate"),
        "accession_number": _str(ds, "AccessionNumber"),
        "study_instance_uid": _str(ds, "StudyInstanceUID"),
        "series_instance_uid": _str(ds, "SeriesInstanceUID"),
        "sop_instance_uid": _str(ds, "SOPInstanceUID"),
        "institution_name": _str(ds, "InstitutionName"),
    }
    return DecodedImage(
        pixels=pixels,
        modality=modality,
        view=view,
        photometric=photometric,
        transfer_syntax=ts_name,
        bits_stored=int(bits_stored),
        shape=(int(pixels.shape[0]), int(pixels.shape[1])),
        warnings=warnings,
        dicom_meta=dicom_meta,
        patient=patient,
        reduction=reduction,
    )


SUPINE_TAGS = ("PatientPosition", "SeriesDescription", "ProtocolName", "StudyDescription",
               "AcquisitionDeviceProcessingDescription", "ViewName")
DEFLATED_TS = "1.2.840.10008.1.2.1.99"
HEADER_INFLATE_LIMIT = 8 * 1024 * 1024  # inflated data set before Pixel Data, at most
INFLATE_SLACK = 1024 * 1024  # beyond the pixel bytes the header allows (trailing elements, padding)
_PIXEL_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
_INFLATE_STEP = 256 * 1024


class _DeflatedDataSet:
    """A Deflated Explicit VR Little Endian data set, inflated in two bounded steps (see module doc)."""

    def __init__(self, data: bytes, offset: int, preamble: bytes | None, meta) -> None:
        import zlib

        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._pending: bytes = data[offset:]
        self._out = bytearray()
        self._ended = False
        self.preamble, self.meta = preamble, meta
        self.pixel_data_seen = False
        self.header_length = 0

    @classmethod
    def open(cls, data: bytes) -> "_DeflatedDataSet | None":
        """Read the (never compressed) file meta; a ``_DeflatedDataSet`` when the syntax is Deflated."""
        from pydicom.filereader import _read_file_meta_info, read_preamble

        if len(data) < 132 or data[128:132] != b"DICM":
            return None  # dcmread gives the usual refusal
        try:
            fp = io.BytesIO(data)
            preamble = read_preamble(fp, False)
            meta = _read_file_meta_info(fp)
        except Exception:  # noqa: BLE001 - a broken meta header: dcmread refuses it with a reason
            return None
        if str(meta.get("TransferSyntaxUID", "") or "") != DEFLATED_TS:
            return None
        return cls(data, fp.tell(), preamble, meta)

    def _inflate_to(self, limit: int) -> None:
        try:
            while not self._ended and len(self._out) < limit:
                chunk = self._z.decompress(self._pending, min(_INFLATE_STEP, limit - len(self._out)))
                self._pending = self._z.unconsumed_tail
                self._out += chunk
                if self._z.eof or (not chunk and not self._pending):
                    self._ended = True
        except Exception as exc:  # zlib.error: corrupt stream
            raise ImageRefused("undecodable", f"the deflated data set is corrupt ({type(exc).__name__}); "
                               "expected a valid Deflated Explicit VR Little Endian file") from None

    def _dataset(self, raw: bytes, stop_at_pixels: bool):
        from pydicom.dataset import FileDataset
        from pydicom.filereader import read_dataset

        stopped = []

        def stop_when(tag, vr, length) -> bool:
            if tag == 0x7FE00010:
                stopped.append(True)
                return True
            return False

        ds = read_dataset(io.BytesIO(raw), False, True, stop_when=stop_when if stop_at_pixels else None)
        fds = FileDataset("", ds, preamble=self.preamble, file_meta=self.meta)
        return fds, bool(stopped)

    def header(self):
        """The data set up to (not including) Pixel Data; at most ``HEADER_INFLATE_LIMIT`` inflated."""
        searched = 0
        while True:
            self._inflate_to(min(HEADER_INFLATE_LIMIT, len(self._out) + _INFLATE_STEP))
            at = self._out.find(_PIXEL_TAG, max(0, searched - 3))
            searched = len(self._out)
            if at >= 0 or self._ended:
                ds, stopped = self._dataset(bytes(self._out), stop_at_pixels=True)
                if stopped or self._ended:
                    self.pixel_data_seen = stopped
                    return ds
            if len(self._out) >= HEADER_INFLATE_LIMIT:
                raise ImageRefused("decompression-bomb", f"the deflated data set inflates to more than "
                                   f"{HEADER_INFLATE_LIMIT // (1024 * 1024)} MiB before its Pixel Data; expected a "
                                   "radiograph header")

    def full(self, pixel_bytes: int, rows: int, cols: int, bits: int):
        """The whole data set, inflated to at most the header's pixel bytes + the header + slack."""
        limit = len(self._out) + pixel_bytes + INFLATE_SLACK
        self._inflate_to(limit + 1)
        if len(self._out) > limit:
            raise ImageRefused("decompression-bomb", f"the deflated data set inflates beyond what its header allows "
                               f"({rows} x {cols} pixels at {bits} bits + {INFLATE_SLACK // 1024} KiB); refused "
                               "before decoding")
        raw, self._out, self._pending = bytes(self._out), bytearray(), b""
        ds, _ = self._dataset(raw, stop_at_pixels=False)
        return ds


_JPEG_TS = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
            "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
_J2K_TS = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
           "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"}
_RLE_TS = "1.2.840.10008.1.2.5"


def _jpeg_dimensions(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) from the first SOF (JPEG) or SOF55 (JPEG-LS) marker; None if not found."""
    i, n = 2, len(frame)
    if frame[:2] != b"\xff\xd8":
        return None
    while i + 4 <= n:
        if frame[i] != 0xFF:
            i += 1
            continue
        marker = frame[i + 1]
        if marker in (0xFF, 0x01) or 0xD0 <= marker <= 0xD8:
            i += 1 if marker == 0xFF else 2
            continue
        length = int.from_bytes(frame[i + 2:i + 4], "big")
        if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:
            if i + 9 > n:
                return None
            return int.from_bytes(frame[i + 5:i + 7], "big"), int.from_bytes(frame[i + 7:i + 9], "big")
        if marker == 0xDA:  # start of scan without a frame header
            return None
        i += 2 + length
    return None


def _j2k_dimensions(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) from the SIZ marker of a JPEG 2000 codestream (raw or inside a JP2 box)."""
    at = frame.find(b"\xff\x4f\xff\x51", 0, 65536)
    if at < 0 or at + 24 > len(frame):
        return None
    siz = at + 4
    xsiz, ysiz, xo, yo = (int.from_bytes(frame[siz + k:siz + k + 4], "big") for k in (4, 8, 12, 16))
    return max(0, ysiz - yo), max(0, xsiz - xo)


def _rle_segment_length(seg: memoryview, limit: int) -> int:
    """Decoded length of one PackBits segment, counted from its run headers (nothing decoded);
    stops counting as soon as ``limit`` is passed."""
    total, i, n = 0, 0, len(seg)
    while i < n and total <= limit:
        h = seg[i]
        if h < 128:
            total += h + 1
            i += h + 2
        elif h > 128:
            total += 257 - h
            i += 2
        else:
            i += 1
    return total


def _check_encapsulated(ds, ts_uid: str, rows: int, cols: int, samples: int, bits_alloc: int) -> None:
    """Refuse an encapsulated frame that would decode to more than the header allows (module doc)."""
    try:
        from pydicom.encaps import generate_frames

        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception:  # noqa: BLE001 - malformed encapsulation: the decoders refuse it with a reason
        return
    dims = None
    if ts_uid in _JPEG_TS:
        dims = _jpeg_dimensions(frame)
    elif ts_uid in _J2K_TS:
        dims = _j2k_dimensions(frame)
    elif ts_uid == _RLE_TS:
        if len(frame) < 64:
            return
        n_seg = int.from_bytes(frame[:4], "little")
        expected = samples * (bits_alloc // 8)
        if n_seg > 15 or n_seg > expected:
            raise ImageRefused("decompression-bomb", f"the RLE frame has {n_seg} segments; the header allows {expected}")
        offsets = [int.from_bytes(frame[4 + 4 * k:8 + 4 * k], "little") for k in range(n_seg)] + [len(frame)]
        view = memoryview(frame)
        per_segment = rows * cols + 1  # a segment may be padded to an even length
        for k in range(n_seg):
            a, b = offsets[k], offsets[k + 1]
            if not (64 <= a <= b <= len(frame)):
                return  # malformed: the decoders refuse it
            if _rle_segment_length(view[a:b], per_segment) > per_segment:
                raise ImageRefused("decompression-bomb", f"an RLE segment decodes to more than the header's "
                                   f"{rows} x {cols} pixels; refused before decoding")
        return
    if dims is not None and (dims[0] > rows or dims[1] > cols):
        raise ImageRefused("decompression-bomb", f"the compressed frame declares {dims[0]} x {dims[1]} pixels but "
                           f"the DICOM header {rows} x {cols}; refused before decoding")


def _check_complete(ds, read_warnings: list[str]) -> None:
    """pydicom stops silently at the end of a cut file: detect an empty data set, a short last element
    or an unterminated encapsulated Pixel Data element."""
    if any("end of file" in m.lower() for m in read_warnings):
        raise ImageRefused("truncated", "the file ends inside an element (no sequence/item delimiter); expected a complete file")
    if len(ds) == 0:
        raise ImageRefused("truncated", "the file holds file meta information but no data set; expected a complete DICOM file")
    try:
        last = ds.get_item(max(ds.keys()))
    except Exception:  # noqa: BLE001
        return
    length = getattr(last, "length", None)
    value = getattr(last, "value", None)
    if isinstance(value, (bytes, bytearray)) and length is not None and length != 0xFFFFFFFF and len(value) < length:
        raise ImageRefused(
            "truncated", f"the file ends {length - len(value)} bytes short of its last element's declared length; expected a complete file"
        )


def _decode_reduced(ds, ts_uid, rows: int, cols: int, bits_stored: int, target_size: int) -> tuple[np.ndarray, int] | None:
    """Stored values (H', W') int32 of a reduced JPEG 2000 resolution level and its ``k``, or None.

    None (→ the caller decodes at full resolution) unless: the transfer syntax is JPEG 2000
    (``models.j2k.J2K_TRANSFER_SYNTAXES``); the codestream agrees with the header (Columns x Rows,
    one component, precision = BitsStored, signedness = PixelRepresentation); some ``k`` ≥ 1 leaves both sides ≥ ``REDUCED_DECODE_OVERSAMPLE
    * target_size``; and Pillow/OpenJPEG decodes it to the expected shape. Any failure → None.
    """
    if ts_uid is None or str(ts_uid) not in _j2k().J2K_TRANSFER_SYNTAXES or int(target_size) < 1:
        return None
    j2k = _j2k()
    try:
        from pydicom.encaps import generate_frames

        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        codestream = j2k.codestream_of(frame)
        header = j2k.parse_header(codestream)
        signed = (_int(ds, "PixelRepresentation") or 0) == 1
        if (header.width, header.height) != (cols, rows) or header.components != 1 or header.precision != bits_stored \
                or header.signed != signed:
            return None
        k = j2k.choose_reduction(header, REDUCED_DECODE_OVERSAMPLE * int(target_size))
        if k < 1:
            return None
        return j2k.decode_reduced(codestream, header, k), k
    except _FATAL:
        raise
    except BaseException as exc:  # noqa: BLE001 - any failure: the full decode is the fallback
        _log.debug("reduced JPEG 2000 decode not used (%s); full decode", type(exc).__name__)
        return None


def _has_voi(ds) -> bool:
    """The image names a VOI LUT or a window (else ``_to_unit_range`` scales min–max)."""
    return "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)


# margin over robust_window's MIN_RANGE: the percentiles read here (reduced pixels) and in
# prepare_image (the resized array) are close but not equal
_GAIN_MARGIN = 2.0


def _minmax_gain_divided_out(pixels: np.ndarray, reduced_span: float, ds, bits_stored: int) -> bool:
    """True when the reduced level's min–max scaling cannot change the prepared array.

    Without a window both paths scale min–max, each with its own extremes, then ``prepare_image``'s
    ``robust_window`` divides any such gain out — if it rescales, i.e. if the percentile range of the
    min–max-scaled image is ≥ ``MIN_RANGE``. ``pixels``: the reduced level min–max-scaled (H, W) in
    [0, 1]; ``reduced_span``: its stored-value range. The percentile range in stored units,
    (P_high − P_low) × ``reduced_span``, divided by the widest span a full-resolution min–max can
    have (2**BitsStored − 1), bounds the full path's range from below (up to the small difference
    between percentiles read on the reduced level and on the resized full image, which the margin
    covers); when that bound is ≥ ``_GAIN_MARGIN * MIN_RANGE`` both paths rescale. An image with almost no contrast — a flat film whose
    extremes are a few hot pixels the low-pass softens — fails the bound and is decoded at full
    resolution. A Modality LUT sequence (output range set by the LUT) always is.
    """
    if ds.get("ModalityLUTSequence"):
        return False
    from models.intensity import MIN_RANGE, percentile_window

    lo, hi = percentile_window(pixels)
    widest = float(2 ** int(bits_stored) - 1)
    return bool(np.isfinite(lo) and np.isfinite(hi) and (hi - lo) * reduced_span >= _GAIN_MARGIN * MIN_RANGE * widest)


def _j2k():
    from models import j2k

    return j2k


def _decode_pixels(ds, ts_uid, ts_name, rows: int, cols: int, bits_alloc: int) -> np.ndarray:
    """Stored pixel values (H, W) via pydicom's pixel_array (all installed plugins, gdcm included)."""
    import warnings as _w

    compressed = bool(ts_uid is not None and getattr(ts_uid, "is_compressed", False))
    if not compressed:
        expected = rows * cols * (bits_alloc // 8)
        got = len(ds.PixelData) if ds.PixelData is not None else 0
        if got < expected:
            raise ImageRefused(
                "truncated", f"Pixel Data holds {got} bytes; {rows} x {cols} at {bits_alloc} bits needs {expected}; expected a complete file"
            )
    errors: list[str] = []
    arr = None
    try:
        with _w.catch_warnings():
            _w.simplefilter("ignore")
            arr = ds.pixel_array  # pydicom tries every available plugin: gdcm, pylibjpeg, pyjpegls, Pillow, pydicom
    except _FATAL:
        raise
    except BaseException as exc:  # noqa: BLE001 - Rust decoders raise PanicException (a BaseException)
        errors.append(" ".join(str(exc).split())[:240] or type(exc).__name__)
    if arr is None and compressed:
        # a decoder may abort pydicom's own plugin loop (e.g. a panic in pylibjpeg-rle): try each plugin alone
        try:
            from pydicom.pixels import get_decoder

            plugins = list(get_decoder(ts_uid).available_plugins)
        except Exception:  # noqa: BLE001
            plugins = []
        for plugin in plugins:
            try:
                with _w.catch_warnings():
                    _w.simplefilter("ignore")
                    ds.pixel_array_options(decoding_plugin=plugin)
                    arr = ds.pixel_array
                break
            except _FATAL:
                raise
            except BaseException as exc:  # noqa: BLE001
                errors.append(f"{plugin}: {type(exc).__name__}")
    if arr is None:
        raise ImageRefused(
            "undecodable",
            f"pixel data in transfer syntax '{ts_name or 'unknown'}' could not be decoded by any available decoder "
            f"(pylibjpeg, pyjpegls, python-gdcm, Pillow, pydicom): {'; '.join(errors)[:400]}",
        )
    arr = np.asarray(arr)
    if arr.ndim != 2 or arr.shape != (rows, cols):
        raise ImageRefused("undecodable", f"decoded pixel array has shape {arr.shape}; expected ({rows}, {cols})")
    return arr


def _to_unit_range(arr: np.ndarray, ds, photometric: str) -> tuple[np.ndarray, str | None]:
    """Modality LUT/rescale, VOI LUT/window, scale to [0, 1], invert MONOCHROME1. Returns (pixels, note).

    ``arr``: stored values (H, W) (any resolution: the full image or a reduced J2K level). Returns
    float32 (H, W) in [0, 1]. Works in float32, in place where it can (one full-size float32 buffer
    instead of pydicom's float64 copies); the linear window (LINEAR / LINEAR_EXACT, the usual case)
    is computed here with the same piecewise definition as ``pydicom.pixels.apply_windowing``
    (PS3.3 C.11.2.1.2), the window's output range (and its sign) still taken from pydicom by windowing
    the two extremes. VOI LUT sequences, SIGMOID windows and Modality LUT sequences go through pydicom.
    Agreement with the float64 reference is tested (max abs difference < 1e-5).
    """
    import warnings as _w

    from pydicom.pixels import apply_modality_lut, apply_voi_lut, apply_windowing

    note = None
    with _w.catch_warnings():
        _w.simplefilter("ignore")
        if ds.get("ModalityLUTSequence"):
            values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
        else:
            values = np.array(arr, dtype=np.float32)  # the one full-size working buffer (a copy)
            if "RescaleSlope" in ds and "RescaleIntercept" in ds:
                slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
                if slope != 1.0:
                    values *= np.float32(slope)
                if intercept != 0.0:
                    values += np.float32(intercept)
        out = None
        if "VOILUTSequence" in ds:
            try:
                lut_out = apply_voi_lut(values.round().astype(np.int64), ds, index=0, prefer_lut=True)
                item = ds.VOILUTSequence[0]
                nbits = int(item.LUTDescriptor[2]) if "LUTDescriptor" in item else 16
                out = np.asarray(lut_out, dtype=np.float32)
                out /= np.float32(2**nbits - 1)
            except Exception:  # noqa: BLE001 - a broken LUT: fall back to the window or min-max
                note = "VOI LUT could not be applied; window/min-max used instead"
                out = None
        if out is None and "WindowCenter" in ds and "WindowWidth" in ds:
            try:
                # the window's own output range (pydicom's y_min..y_max) is found by windowing the
                # extremes; this also raises pydicom's ValueError for an invalid width/function
                bounds = np.asarray(apply_windowing(np.array([-1e12, 1e12]), ds, index=0), dtype=np.float64)
                lo, hi = float(bounds.min()), float(bounds.max())
                if hi > lo:
                    out = _window_unit(values, ds, increasing=bool(bounds[1] >= bounds[0]))
            except Exception:  # noqa: BLE001
                note = "window could not be applied; min-max used instead"
                out = None
    if out is None:
        vmin, vmax = float(values.min()), float(values.max())
        if vmax > vmin:
            out = values
            out -= np.float32(vmin)
            out /= np.float32(vmax - vmin)
        else:
            out = np.zeros_like(values)
            note = "the image is uniform (no contrast)"
    if not np.isfinite(out).all():
        raise ImageRefused("undecodable", "pixel values are not finite after the Modality/VOI LUT")
    np.clip(out, 0.0, 1.0, out=out)
    if photometric == "MONOCHROME1":
        np.subtract(np.float32(1.0), out, out=out)
    return out, note


def _first(value: Any) -> float:
    """First value of a possibly multi-valued DS element, as float."""
    if isinstance(value, (list, tuple)) or (hasattr(value, "__iter__") and not isinstance(value, (str, bytes))):
        value = list(value)[0]
    return float(value)


def _window_unit(values: np.ndarray, ds, *, increasing: bool) -> np.ndarray:
    """The first window applied to ``values`` (float32 (H, W), modified in place), scaled to [0, 1].

    Same result as ``(apply_windowing(values) - y_lo) / (y_hi - y_lo)``: LINEAR / LINEAR_EXACT in
    float32 here; SIGMOID through pydicom. ``increasing=False`` (a negative rescale slope makes
    pydicom's output range decreasing) gives ``1 - t``, as the float64 reference does.
    """
    from pydicom.pixels import apply_windowing

    func = str(getattr(ds, "VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if func not in ("LINEAR", "LINEAR_EXACT"):
        windowed = np.asarray(apply_windowing(values.astype(np.float64), ds, index=0), dtype=np.float64)
        bounds = np.asarray(apply_windowing(np.array([-1e12, 1e12]), ds, index=0), dtype=np.float64)
        lo, hi = float(bounds.min()), float(bounds.max())
        return ((windowed - lo) / (hi - lo)).astype(np.float32)
    center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    if func == "LINEAR":
        center, width = center - 0.5, width - 1.0
    if width > 0:
        values -= np.float32(center)
        values *= np.float32(1.0 / width)
        values += np.float32(0.5)
        np.clip(values, 0.0, 1.0, out=values)
    else:  # LINEAR with width 1: a threshold at center - 0.5
        np.greater(values, np.float32(center), out=values, casting="unsafe")
    if not increasing:
        np.subtract(np.float32(1.0), values, out=values)
    return values


def load_png(path_or_bytes: bytes | str | os.PathLike | BinaryIO, *, max_pixels: int | None = None) -> DecodedImage:
    """Read a PNG/JPEG radiograph (public collection layout; no header, metadata from the CSV).

    8-bit images are scaled by 1/255, deeper ones min–max; RGB is converted to luminance (a warning
    when the channels really differ). Returns ``DecodedImage`` (pixels float32 (H, W) in [0, 1]).
    Raises ``ImageRefused`` (``not-image``, ``too-many-pixels``, ``undecodable`` …) only.
    """
    try:
        return _load_png(path_or_bytes, max_pixels=max_pixels)
    except ImageRefused:
        raise
    except _FATAL:
        raise
    except BaseException as exc:  # noqa: BLE001
        raise ImageRefused("undecodable", f"the image could not be decoded ({type(exc).__name__})") from None


def _load_png(source: Any, *, max_pixels: int | None) -> DecodedImage:
    from PIL import Image, UnidentifiedImageError

    data = _read_source(source)
    if max_pixels is None:
        max_pixels = _default_max_pixels()
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageRefused("not-image", "the file is not a PNG/JPEG image Pillow can read; expected a PNG or JPEG") from None
    except Image.DecompressionBombError:
        raise ImageRefused("too-many-pixels", f"the image exceeds Pillow's decompression-bomb limit; the limit is {max_pixels}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageRefused("too-many-pixels", f"the image declares {h} x {w} = {w * h} pixels; the limit is {max_pixels}")
    if getattr(img, "n_frames", 1) > 1:
        raise ImageRefused("multi-frame", f"the image has {img.n_frames} frames; expected a single image")
    warnings: list[str] = []
    fmt = img.format or "image"
    try:
        img.load()
    except Exception as exc:  # noqa: BLE001
        raise ImageRefused("truncated", f"the {fmt} data is incomplete or corrupt ({type(exc).__name__})") from None
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        bits = 16
        vmin, vmax = float(arr.min()), float(arr.max())
        arr = (arr - vmin) / (vmax - vmin) if vmax > vmin else np.zeros_like(arr)
    else:
        if mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr", "PA"):
            rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
            if np.abs(rgb[..., 0] - rgb[..., 1]).mean() > 3 or np.abs(rgb[..., 1] - rgb[..., 2]).mean() > 3:
                warnings.append("colour content in the image: converted to grayscale")
            img = img.convert("L")
        elif mode != "L":
            img = img.convert("L")
        arr = np.asarray(img, dtype=np.float64) / 255.0
        bits = 8
    pixels = np.clip(arr, 0, 1).astype(np.float32)
    return DecodedImage(
        pixels=pixels,
        modality=None,
        view=None,
        photometric="MONOCHROME2",
        transfer_syntax=fmt,
        bits_stored=bits,
        shape=(int(pixels.shape[0]), int(pixels.shape[1])),
        warnings=warnings,
        dicom_meta={"format": fmt, "mode": mode, "rows": h, "columns": w},
    )


def prepare_image(decoded_pixels: "np.ndarray | DecodedImage", size: int = 256, *, reduction: int = 0,
                  full_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Resize decoded pixels (H, W) in [0, 1] to the cached array: float32 (1, size, size) in [0, 1].

    Plain resize to a square (no padding; chest radiographs are near-square and a plain resize
    keeps heatmaps mappable back onto the original), Pillow bilinear with antialiasing on
    downscaling — deterministic, ~1 ms for 512² → 256².

    A ``DecodedImage`` may be passed instead of an array: its ``pixels``, ``reduction`` and full
    Rows x Columns are used. ``reduction`` k > 0 (pixels are JPEG 2000 resolution level k of a
    ``full_shape`` = (rows, cols) image): the wavelet low-pass centres reduced pixel n on
    full-resolution pixel 2**k·n, not on the middle of its 2**k block, so the source box is shifted
    by (1 - 2**-k)/2 reduced pixels and spans cols/2**k x rows/2**k; every output pixel then samples
    the same place as the full-resolution resize (without it: a 1.5-pixel shift at k = 2).
    Last step: ``models.intensity.robust_window`` (0.5–99.5 percentile window), the same for DICOM,
    8-bit and 16-bit PNG, so the file format leaves no fingerprint in the array.
    """
    from PIL import Image

    if isinstance(decoded_pixels, DecodedImage):
        d = decoded_pixels
        reduction = int(d.reduction or 0)
        if reduction:
            full_shape = (int(d.dicom_meta["rows"]), int(d.dicom_meta["columns"]))
        decoded_pixels = d.pixels
    arr = np.asarray(decoded_pixels, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise ValueError(f"expected a 2-D image (H, W), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("image contains non-finite values")
    box = None
    if reduction:
        if full_shape is None:
            raise ValueError("prepare_image: reduction > 0 needs full_shape (rows, cols) of the full-resolution image")
        scale = float(2 ** int(reduction))
        shift = 0.5 * (1.0 - 1.0 / scale)
        box = (shift, shift, shift + full_shape[1] / scale, shift + full_shape[0] / scale)
        # the box reaches < 1 pixel past the last reduced row/column (Pillow refuses that): repeat the edge
        arr = np.pad(arr, ((0, 1), (0, 1)), mode="edge")
    if arr.shape == (size, size) and box is None:
        out = arr.copy()
    else:
        img = Image.fromarray(np.ascontiguousarray(arr))  # mode "F" (float32)
        out = np.asarray(img.resize((size, size), resample=Image.Resampling.BILINEAR, box=box), dtype=np.float32)
    # the one intensity normalisation for every format (models/intensity.py; docs/INTERFACES.md)
    from models.intensity import robust_window

    return robust_window(np.clip(out, 0.0, 1.0))[None, :, :].astype(np.float32)


def decode_and_prepare(source: bytes | str | os.PathLike | BinaryIO, size: int = 256, *, max_pixels: int | None = None,
                       reduced: bool = True) -> tuple[DecodedImage, np.ndarray]:
    """The model-input path for one DICOM: decode (reduced JPEG 2000 level when allowed) + ``prepare_image``.

    ``size``: side of the model-input array (``cache_image_size``); ``reduced=False`` forces the full
    decode (``CXR_REDUCED_DECODE=0``). Returns ``(decoded, image)``: ``decoded`` as ``decode_dicom``
    returns it (``decoded.pixels`` possibly at a reduced resolution, ``decoded.reduction`` levels),
    ``image`` float32 (1, size, size) in [0, 1]. Raises ``ImageRefused`` only.
    """
    decoded = decode_dicom(source, max_pixels=max_pixels, target_size=int(size) if reduced else None)
    return decoded, prepare_image(decoded, size)


# ------------------------------------------------------------------------------------------------
# Vitals
# ------------------------------------------------------------------------------------------------
VITAL_FIELDS: tuple[str, ...] = (
    "temperature_c",
    "spo2_percent",
    "heart_rate_bpm",
    "respiratory_rate",
    "systolic_bp_mmhg",
    "age_years",
)
VITAL_RANGES: dict[str, tuple[float, float]] = {
    "temperature_c": (30.0, 45.0),
    "spo2_percent": (50.0, 100.0),
    "heart_rate_bpm": (20.0, 250.0),
    "respiratory_rate": (4.0, 80.0),
    "systolic_bp_mmhg": (50.0, 260.0),
    "age_years": (0.0, 120.0),
}
VITAL_UNITS: dict[str, str] = {
    "temperature_c": "°C",
    "spo2_percent": "%",
    "heart_rate_bpm": "/min",
    "respiratory_rate": "/min",
    "systolic_bp_mmhg": "mmHg",
    "age_years": "years",
}
SEX_VALUES = ("M", "F", "other", "unknown")
ADULT_AGE_YEARS = 18.0

# input key → canonical field (public collection and common spellings)
_ALIASES = {
    "pO2_saturation": "spo2_percent",
    "po2_saturation": "spo2_percent",
    "spo2": "spo2_percent",
    "temperature": "temperature_c",
    "age": "age_years",
    "heart_rate": "heart_rate_bpm",
    "systolic_bp": "systolic_bp_mmhg",
}
_SEX_MAP = {
    "m": "M", "male": "M", "man": "M",
    "f": "F", "female": "F", "woman": "F",
    "o": "other", "other": "other", "x": "other", "diverse": "other", "non-binary": "other", "nonbinary": "other",
    "u": "unknown", "unknown": "unknown", "unk": "unknown", "not known": "unknown",
}
_CELSIUS_UNITS = {"c", "°c", "cel", "celsius", "degc", "[degc]"}
_FAHRENHEIT_UNITS = {"f", "°f", "fahrenheit", "degf", "[degf]"}
_MISSING_STRINGS = {"", "na", "n/a", "nan", "none", "null", "-", "?"}


class VitalsError(ValueError):
    """One invalid vital sign: ``field``, ``value`` (as given), ``valid_range`` ((lo, hi) in the field's unit or None), ``reason``."""

    def __init__(self, field: str, value: Any, valid_range: tuple[float, float] | None, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.value = value
        self.valid_range = valid_range
        self.reason = reason


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, str) and value.strip().lower() in _MISSING_STRINGS:
        return True
    try:  # pandas NA / numpy nan
        import pandas as pd

        if not isinstance(value, (str, bytes, dict, list, tuple)) and pd.isna(value):
            return True
    except Exception:  # noqa: BLE001
        pass
    return False


_AGE_RE = re.compile(r"^\s*(\d{1,3})\s*([YMWD])\s*$", re.IGNORECASE)


def _number(fname: str, value: Any) -> float:
    if isinstance(value, bool):
        raise VitalsError(fname, value, VITAL_RANGES.get(fname), "expected a number, got a boolean")
    if isinstance(value, (int, float, np.integer, np.floating)):
        x = float(value)
    elif isinstance(value, str):
        text = value.strip()
        m = _AGE_RE.match(text) if fname == "age_years" else None
        if m:  # DICOM Age String, e.g. 045Y / 006M
            n, unit = int(m.group(1)), m.group(2).upper()
            x = n / {"Y": 1, "M": 12, "W": 52.1775, "D": 365.25}[unit]
        else:
            try:
                x = float(text)
            except ValueError:
                raise VitalsError(fname, value, VITAL_RANGES.get(fname), f"'{text[:40]}' is not a number") from None
    else:
        raise VitalsError(fname, value, VITAL_RANGES.get(fname), f"expected a number, got {type(value).__name__}")
    if not math.isfinite(x):
        raise VitalsError(fname, value, VITAL_RANGES.get(fname), "expected a finite number")
    return x


def _check_range(fname: str, x: float, given: Any, hint: str = "") -> float:
    lo, hi = VITAL_RANGES[fname]
    if not (lo <= x <= hi):
        raise VitalsError(
            fname, given, (lo, hi), f"{x:g} {VITAL_UNITS[fname]} is outside the valid range {lo:g}–{hi:g} {VITAL_UNITS[fname]}{hint}"
        )
    return x


def _temperature(key: str, value: Any) -> float | None:
    """°C from ``temperature_c``/``temperature`` (°C, or {"value", "unit"}) or ``temperature_f`` (°F)."""
    fahrenheit = key == "temperature_f"
    if isinstance(value, Mapping):
        unit = str(value.get("unit", "")).strip().lower()
        raw = value.get("value")
        if unit in _FAHRENHEIT_UNITS:
            fahrenheit = True
        elif unit in _CELSIUS_UNITS:
            if key == "temperature_f":
                raise VitalsError("temperature_c", value, VITAL_RANGES["temperature_c"], "temperature_f given with unit °C")
            fahrenheit = False
        else:
            raise VitalsError("temperature_c", value, VITAL_RANGES["temperature_c"], f"unknown temperature unit '{unit}'; expected C or F")
        value_given = value
        value = raw
        if _is_missing(value):
            return None
    else:
        value_given = value
        if _is_missing(value):
            return None
    x = _number("temperature_c", value)
    if fahrenheit:
        x = (x - 32.0) * 5.0 / 9.0
        return _check_range("temperature_c", round(x, 2), value_given, " (converted from °F)")
    hint = " — if this is °F, send it as temperature_f or with unit F" if 86 <= x <= 113 else ""
    return _check_range("temperature_c", x, value_given, hint)


def _sex(value: Any) -> str:
    if _is_missing(value):
        return "unknown"
    text = str(value).strip().lower()
    if text in _SEX_MAP:
        return _SEX_MAP[text]
    raise VitalsError("sex", value, None, f"'{str(value)[:20]}' is not a recognised sex; expected M, F, other or unknown")


def parse_vitals(mapping: Mapping[str, Any] | None, *, strict: bool = False) -> dict[str, Any]:
    """Validate one set of vitals; return ``{field: float | None for VITAL_FIELDS} | {"sex": str}``.

    Units: temperature_c °C (°F only as ``temperature_f`` or ``{"value": v, "unit": "F"}``),
    spo2_percent %, heart_rate_bpm /min, respiratory_rate /min, systolic_bp_mmhg mmHg, age_years
    years (a DICOM age string like ``045Y`` is accepted). Aliases: ``pO2_saturation`` → spo2_percent,
    ``temperature`` → temperature_c, ``age`` → age_years. Missing (absent, None, NaN, "") → None;
    ``sex`` → M/F/other/unknown. Out-of-range or non-numeric → ``VitalsError`` (never clipped).
    ``strict=True`` also refuses unknown keys (the API); ingest rows carry other columns.
    """
    out: dict[str, Any] = {f: None for f in VITAL_FIELDS}
    out["sex"] = "unknown"
    if mapping is None:
        return out
    if not isinstance(mapping, Mapping):
        raise VitalsError("vitals", mapping, None, f"expected an object of vital signs, got {type(mapping).__name__}")
    seen: dict[str, str] = {}
    for key, value in mapping.items():
        key_s = str(key)
        canon = "temperature_c" if key_s == "temperature_f" else _ALIASES.get(key_s, key_s)
        if canon == "sex":
            out["sex"] = _sex(value)
            continue
        if canon not in VITAL_RANGES:
            if strict:
                raise VitalsError(key_s, value, None, f"unknown field; expected one of {', '.join(VITAL_FIELDS)}, sex")
            continue
        if canon == "temperature_c":
            x = _temperature(key_s, value)
        else:
            if isinstance(value, Mapping):
                value = value.get("value")
            x = None if _is_missing(value) else _check_range(canon, _number(canon, value), value)
        if canon in seen:
            if x is None:
                continue
            if out[canon] is not None and abs(out[canon] - x) > 0.05:
                raise VitalsError(canon, value, VITAL_RANGES[canon], f"given twice with different values ({seen[canon]} and {key_s})")
        seen[canon] = key_s
        if x is not None or out[canon] is None:
            out[canon] = x
    return out


def vitals_warnings(vitals: Mapping[str, Any]) -> list[str]:
    """Warnings (not errors) for parsed vitals, e.g. age under 18 for this adult model."""
    notes = []
    age = vitals.get("age_years")
    if age is not None and age < ADULT_AGE_YEARS:
        notes.append(f"age {age:g} years is under {ADULT_AGE_YEARS:g}: the model is trained on adults")
    missing = [f for f in VITAL_FIELDS if vitals.get(f) is None]
    if missing:
        notes.append(f"missing vitals: {', '.join(missing)}")
    return notes
