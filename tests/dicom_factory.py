"""Small builders of real DICOM files for tests (decoding, refusals, API hostile-input tests).

``make_dicom(...) -> bytes`` writes a complete DICOM Part 10 file with pydicom in any transfer
syntax the project accepts. Encoders: native (little/big endian, implicit, deflated) by pydicom;
RLE by pydicom; JPEG 2000 (lossless/lossy) by pylibjpeg-openjpeg; JPEG-LS by pyjpegls; JPEG
baseline by Pillow (8-bit) + encapsulation; JPEG lossless (process 14) by python-gdcm.
All values are fake; pixel content is a deterministic pattern (``pattern_pixels``).
"""
from __future__ import annotations

import io
import os
import tempfile

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

CR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1"
DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"
CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"
SOP_FOR_MODALITY = {
    "CR": CR_SOP_CLASS,
    "DX": DX_SOP_CLASS,
    "CT": CT_SOP_CLASS,
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "OT": "1.2.840.10008.5.1.4.1.1.7",
}
NATIVE = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian}
LOSSLESS = NATIVE | {RLELossless, JPEG2000Lossless, JPEGLSLossless, JPEGLosslessSV1, JPEGLossless}
FAKE_PATIENT_NAME = "TESTPERSON^ZELDA^Q"
FAKE_PATIENT_ID = "MRN-99887766"


def pattern_pixels(rows: int, cols: int, bits: int, seed: int = 0) -> np.ndarray:
    """Deterministic stored values (rows, cols) using the full 0..2**bits-1 range: gradient + blocks + noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols]
    maxv = 2**bits - 1
    base = (x / max(cols - 1, 1)) * 0.6 + (y / max(rows - 1, 1)) * 0.3
    base += 0.1 * (((x // 8) + (y // 8)) % 2)
    base += rng.normal(0, 0.01, size=(rows, cols))
    arr = np.clip(np.round(base / base.max() * maxv), 0, maxv)
    arr[0, 0], arr[-1, -1] = 0, maxv  # full range: min-max scaling is exact
    return arr.astype(np.uint8 if bits <= 8 else np.uint16)


def _gdcm_transcode(data: bytes, ts: str) -> bytes:
    import gdcm

    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "in.dcm"), os.path.join(d, "out.dcm")
        with open(src, "wb") as fh:
            fh.write(data)
        reader = gdcm.ImageReader()
        reader.SetFileName(src)
        assert reader.Read(), "gdcm could not read the source file"
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(ts)))
        change.SetInput(reader.GetImage())
        assert change.Change(), f"gdcm could not transcode to {ts}"
        writer = gdcm.ImageWriter()
        writer.SetFileName(dst)
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write()
        with open(dst, "rb") as fh:
            return fh.read()


def make_dataset(
    *,
    modality: str | None = "CR",
    photometric: str = "MONOCHROME2",
    rows: int = 64,
    cols: int = 64,
    bits: int = 12,
    view: str | None = "PA",
    body_part: str | None = "CHEST",
    frames: int = 1,
    patient_name: str = FAKE_PATIENT_NAME,
    patient_id: str = FAKE_PATIENT_ID,
    sop_class_uid: str | None = None,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    signed: bool = False,
) -> Dataset:
    """A header-only Dataset (no Pixel Data) with the given attributes; None omits an attribute."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_class = sop_class_uid or SOP_FOR_MODALITY.get(modality or "", CR_SOP_CLASS)
    sop_inst = pydicom.uid.generate_uid(entropy_srcs=[patient_id, str(rows), str(cols), modality or "", photometric])
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_inst
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_inst
    ds.StudyInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[patient_id, "study"])
    ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[patient_id, "series"])
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19610203"
    ds.PatientSex = "F"
    ds.AccessionNumber = "ACC20200101"
    ds.StudyDate = "20200315"
    ds.InstitutionName = "Test General Hospital"
    if modality is not None:
        ds.Modality = modality
    if view is not None:
        ds.ViewPosition = view
    if body_part is not None:
        ds.BodyPartExamined = body_part
    ds.Rows, ds.Columns = rows, cols
    colour = photometric in ("RGB",) or photometric.startswith("YBR")
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def make_dicom(
    modality: str | None = "CR",
    photometric: str = "MONOCHROME2",
    rows: int = 64,
    cols: int = 64,
    bits: int = 12,
    transfer_syntax: str | UID = ExplicitVRLittleEndian,
    view: str | None = "PA",
    body_part: str | None = "CHEST",
    frames: int = 1,
    patient_name: str = FAKE_PATIENT_NAME,
    patient_id: str = FAKE_PATIENT_ID,
    *,
    pixels: np.ndarray | None = None,
    pixel_data: bool = True,
    sop_class_uid: str | None = None,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    signed: bool = False,
    fake_pixel_bytes: bytes | None = None,
    seed: int = 0,
) -> bytes:
    """A DICOM Part 10 file as bytes.

    ``pixels``: stored values (rows, cols) (or (frames, rows, cols), (rows, cols, 3) for colour);
    default ``pattern_pixels``. ``pixel_data=False`` leaves Pixel Data out. ``fake_pixel_bytes``
    writes those bytes as native Pixel Data whatever the header says (decompression-bomb headers).
    """
    ts = UID(str(transfer_syntax))
    ds = make_dataset(
        modality=modality, photometric=photometric, rows=rows, cols=cols, bits=bits, view=view, body_part=body_part,
        frames=frames, patient_name=patient_name, patient_id=patient_id, sop_class_uid=sop_class_uid, rescale=rescale,
        window=window, signed=signed,
    )
    if not pixel_data:
        ds.file_meta.TransferSyntaxUID = ts if ts in NATIVE else ExplicitVRLittleEndian
        return to_bytes(ds)
    if fake_pixel_bytes is not None:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = fake_pixel_bytes
        ds["PixelData"].VR = "OW" if ds.BitsAllocated > 8 else "OB"
        return to_bytes(ds)
    samples = ds.SamplesPerPixel
    if pixels is None:
        plane = pattern_pixels(rows, cols, bits, seed)
        if samples == 3:
            pixels = np.stack([plane, plane[::-1], plane[:, ::-1]], axis=-1)
        elif frames > 1:
            pixels = np.stack([plane] * frames)
        else:
            pixels = plane
    pixels = np.asarray(pixels)
    if signed:
        pixels = pixels.astype(np.int16 if bits > 8 else np.int8)
    else:
        pixels = pixels.astype(np.uint16 if bits > 8 else np.uint8)

    if ts in NATIVE:
        ds.file_meta.TransferSyntaxUID = ts
        dtype = pixels.dtype.newbyteorder(">" if ts == ExplicitVRBigEndian else "<")
        ds.PixelData = pixels.astype(dtype).tobytes()
        ds["PixelData"].VR = "OW" if ds.BitsAllocated > 8 else "OB"
        return to_bytes(ds)
    if ts == JPEGBaseline8Bit:
        from PIL import Image

        assert bits == 8 and samples == 1 and frames == 1, "JPEG baseline here: 8-bit grayscale single frame"
        buf = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8), mode="L").save(buf, format="JPEG", quality=95)
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.LossyImageCompression = "01"
        return to_bytes(ds)
    if ts in (JPEGLosslessSV1, JPEGLossless):
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
        ds["PixelData"].VR = "OW" if ds.BitsAllocated > 8 else "OB"
        return _gdcm_transcode(to_bytes(ds), str(ts))
    kwargs: dict = {}
    if ts == JPEG2000:
        kwargs = {"j2k_cr": [10], "encoding_plugin": "pylibjpeg"}
        ds.PhotometricInterpretation = photometric
    elif ts == JPEG2000Lossless:
        kwargs = {"encoding_plugin": "pylibjpeg"}
    elif ts == JPEGLSNearLossless:
        kwargs = {"jls_error": 2}
    ds.compress(ts, pixels, generate_instance_uid=False, **kwargs)
    return to_bytes(ds)


def rewrap_as_chest(testdata_name: str, **changes) -> bytes:
    """A pydicom test file re-labelled as a CR PA chest image (its pixel data unchanged)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(testdata_name)
    assert path is not None, f"pydicom test file {testdata_name} not available offline"
    ds = pydicom.dcmread(path)
    ds.Modality = "CR"
    ds.SOPClassUID = CR_SOP_CLASS
    ds.file_meta.MediaStorageSOPClassUID = CR_SOP_CLASS
    ds.ViewPosition = "PA"
    ds.BodyPartExamined = "CHEST"
    for k, v in changes.items():
        setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()
