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

Refusal codes (``ImageRefused.code``): ``wrong-modality``, ``not-chest``, ``lateral-view``,
``not-frontal``, ``colour-image``, ``multi-frame``, ``no-pixel-data``, ``bits-stored``,
``too-many-pixels``, ``not-dicom``, ``truncated``, ``undecodable``; for paths also ``not-found``,
``not-a-file``, ``unreadable``; ``load_png`` adds ``not-image``.

Then pixels are decoded through pydicom's ``pixel_array``, which tries every installed decoder plugin
in turn (python-gdcm, pylibjpeg, pyjpegls, Pillow, pydicom's own): where pylibjpeg fails (e.g. some
12-bit JPEG Extended files) python-gdcm is the second decoder; when all fail → ``undecodable``
naming the transfer syntax. A short native Pixel Data element → ``truncated``.

Intensity mapping: Modality LUT or RescaleSlope/Intercept (``apply_modality_lut``), then the first
VOI LUT or window (``apply_voi_lut``), scaled to [0, 1] by the window's own output range; without a
VOI transform the image is min–max scaled. MONOCHROME1 is inverted last (``1 - x``).

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
    LUT/rescale and VOI LUT/window. ``shape`` = (H, W) in pixels. ``dicom_meta`` holds non-PHI
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


def decode_dicom(source: bytes | str | os.PathLike | BinaryIO, *, max_pixels: int | None = None) -> DecodedImage:
    """Decode one DICOM chest radiograph; refuse anything outside the image-input contract.

    ``source``: the file's bytes, a path, or a binary stream. ``max_pixels``: largest Rows×Columns
    accepted (default ``get_settings().max_image_pixels``); checked on the header before decoding.
    Returns ``DecodedImage`` (pixels float32 (H, W) in [0, 1], MONOCHROME2 convention).
    Raises ``ImageRefused`` only — any unexpected failure is wrapped into one.
    """
    try:
        return _decode_dicom(source, max_pixels=max_pixels)
    except ImageRefused:
        raise
    except MemoryError:
        raise ImageRefused("too-many-pixels", "not enough memory to decode the image") from None
    except _FATAL:
        raise
    except BaseException as exc:  # noqa: BLE001 - never let a decoder bug (or a Rust panic) escape as a traceback
        # only the exception type: messages may quote header values (identifiers)
        raise ImageRefused("undecodable", f"the file could not be decoded ({type(exc).__name__}); expected a valid DICOM image") from None


def _decode_dicom(source: Any, *, max_pixels: int | None) -> DecodedImage:
    import warnings as _w

    import pydicom
    from pydicom.errors import InvalidDicomError

    data = _read_source(source)
    if max_pixels is None:
        max_pixels = _default_max_pixels()
    if len(data) == 0:
        raise ImageRefused("not-dicom", "the file is empty; expected a DICOM Part 10 file")
    try:
        with _w.catch_warnings(record=True) as read_warnings:
            _w.simplefilter("always")
            ds = pydicom.dcmread(io.BytesIO(data), force=False)
    except InvalidDicomError:
        raise ImageRefused(
            "not-dicom", "no DICOM Part 10 header (128-byte preamble + 'DICM') found; expected a DICOM file"
        ) from None
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
    if "PixelData" not in ds:
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

    arr = _decode_pixels(ds, ts_uid, ts_name, rows, cols, bits_alloc)
    pixels, voi_note = _to_unit_range(arr, ds, photometric)
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
        "patient_sex": _str(ds, "PatientSex"),
        "patient_age": _str(ds, "PatientAge"),
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
    )


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
    """Modality LUT/rescale, VOI LUT/window, scale to [0, 1], invert MONOCHROME1. Returns (pixels, note)."""
    import warnings as _w

    from pydicom.pixels import apply_modality_lut, apply_voi_lut, apply_windowing

    note = None
    with _w.catch_warnings():
        _w.simplefilter("ignore")
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        out = None
        if "VOILUTSequence" in ds:
            try:
                lut_out = np.asarray(apply_voi_lut(values.round().astype(np.int64), ds, index=0, prefer_lut=True), dtype=np.float64)
                item = ds.VOILUTSequence[0]
                nbits = int(item.LUTDescriptor[2]) if "LUTDescriptor" in item else 16
                out = lut_out / float(2**nbits - 1)
            except Exception:  # noqa: BLE001 - a broken LUT: fall back to the window or min-max
                note = "VOI LUT could not be applied; window/min-max used instead"
                out = None
        if out is None and "WindowCenter" in ds and "WindowWidth" in ds:
            try:
                # apply_windowing = apply_voi_lut(prefer_lut=False); the window's own output range
                # (pydicom's y_min..y_max) is found by windowing the extremes
                windowed = np.asarray(apply_windowing(values, ds, index=0), dtype=np.float64)
                bounds = np.asarray(apply_windowing(np.array([-1e12, 1e12]), ds, index=0), dtype=np.float64)
                lo, hi = float(bounds.min()), float(bounds.max())
                if hi > lo:
                    out = (windowed - lo) / (hi - lo)
            except Exception:  # noqa: BLE001
                note = "window could not be applied; min-max used instead"
                out = None
    if out is None:
        vmin, vmax = float(values.min()), float(values.max())
        if vmax > vmin:
            out = (values - vmin) / (vmax - vmin)
        else:
            out = np.zeros_like(values)
            note = "the image is uniform (no contrast)"
    if not np.all(np.isfinite(out)):
        raise ImageRefused("undecodable", "pixel values are not finite after the Modality/VOI LUT")
    out = np.clip(out, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32), note


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


def prepare_image(decoded_pixels: np.ndarray, size: int = 256) -> np.ndarray:
    """Resize decoded pixels (H, W) in [0, 1] to the cached array: float32 (1, size, size) in [0, 1].

    Plain resize to a square (no padding; chest radiographs are near-square and a plain resize
    keeps heatmaps mappable back onto the original), Pillow bilinear with antialiasing on
    downscaling — deterministic, ~1 ms for 512² → 256². Last step: ``models.intensity.robust_window``
    (0.5–99.5 percentile window), the same for DICOM, 8-bit and 16-bit PNG, so the file format leaves
    no fingerprint in the array.
    """
    from PIL import Image

    arr = np.asarray(decoded_pixels, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise ValueError(f"expected a 2-D image (H, W), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("image contains non-finite values")
    if arr.shape == (size, size):
        out = arr.copy()
    else:
        img = Image.fromarray(np.ascontiguousarray(arr))  # mode "F" (float32)
        out = np.asarray(img.resize((size, size), resample=Image.Resampling.BILINEAR), dtype=np.float32)
    # the one intensity normalisation for every format (models/intensity.py; docs/INTERFACES.md)
    from models.intensity import robust_window

    return robust_window(np.clip(out, 0.0, 1.0))[None, :, :].astype(np.float32)


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
