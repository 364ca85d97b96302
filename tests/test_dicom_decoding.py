"""DICOM decoding: every accepted encoding decodes; lossless ones give the exact stored values.

Files are built with pydicom (native, deflated, RLE), pylibjpeg-openjpeg (JPEG 2000), pyjpegls
(JPEG-LS), Pillow (JPEG baseline) and python-gdcm (JPEG lossless); pixel values are compared with
the stored pattern scaled to [0, 1] (no VOI → min–max; the pattern spans the full bit range).
"""
from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from dicom_factory import (
    DX_SOP_CLASS,
    FAKE_PATIENT_NAME,
    JPEG2000,
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
    make_dicom,
    pattern_pixels,
    rewrap_as_chest,
)
from PIL import Image

from models.preprocessing import DecodedImage, ImageRefused, decode_dicom, load_png, prepare_image

LOSSLESS_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLosslessSV1,
    JPEGLossless,
]


def _unit(stored: np.ndarray) -> np.ndarray:
    x = stored.astype(np.float64)
    return (x - x.min()) / (x.max() - x.min())


@pytest.mark.parametrize("bits", [8, 12, 16])
@pytest.mark.parametrize("ts", LOSSLESS_SYNTAXES, ids=lambda u: u.keyword)
def test_lossless_encodings_decode_exactly(ts, bits):
    data = make_dicom(bits=bits, rows=48, cols=40, transfer_syntax=ts)
    assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == ts  # really written in that syntax
    img = decode_dicom(data)
    assert isinstance(img, DecodedImage)
    assert img.pixels.dtype == np.float32 and img.pixels.shape == (48, 40) == img.shape
    assert img.transfer_syntax == ts.name
    assert img.bits_stored == bits
    assert img.modality == "CR" and img.view == "PA" and img.photometric == "MONOCHROME2"
    np.testing.assert_allclose(img.pixels, _unit(pattern_pixels(48, 40, bits)), atol=1e-6)


@pytest.mark.parametrize(
    "ts,bits,tol",
    [(JPEG2000, 12, 0.12), (JPEG2000, 16, 0.12), (JPEGLSNearLossless, 12, 0.002), (JPEGBaseline8Bit, 8, 0.06)],
    ids=["j2k-lossy-12", "j2k-lossy-16", "jpegls-near-lossless-12", "jpeg-baseline-8"],
)
def test_lossy_encodings_decode_close(ts, bits, tol):
    img = decode_dicom(make_dicom(bits=bits, transfer_syntax=ts))
    ref = _unit(pattern_pixels(64, 64, bits))
    err = np.abs(img.pixels - ref)
    assert img.transfer_syntax == ts.name
    assert err.max() <= tol and err.mean() < tol / 4


def test_jpeg_extended_12bit_decodes():
    """pydicom's 12-bit JPEG Extended test file, relabelled as a CR chest image."""
    img = decode_dicom(rewrap_as_chest("JPGExtended.dcm"))
    assert img.transfer_syntax == "JPEG Extended (Process 2 and 4)"
    assert img.shape == (1024, 256) and img.bits_stored == 12
    assert 0.0 <= img.pixels.min() < 0.01 and img.pixels.max() == pytest.approx(1.0)


def test_gdcm_is_a_working_second_decoder():
    """python-gdcm decodes a JPEG lossless file on its own (the fallback where pylibjpeg fails)."""
    ds = pydicom.dcmread(io.BytesIO(make_dicom(bits=12, transfer_syntax=JPEGLosslessSV1)))
    ds.pixel_array_options(decoding_plugin="gdcm")
    np.testing.assert_array_equal(ds.pixel_array, pattern_pixels(64, 64, 12))


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless], ids=lambda u: u.keyword)
def test_monochrome1_is_inverted(ts):
    stored = pattern_pixels(32, 32, 12)
    m2 = decode_dicom(make_dicom(bits=12, rows=32, cols=32, pixels=stored, transfer_syntax=ts))
    m1 = decode_dicom(make_dicom(bits=12, rows=32, cols=32, photometric="MONOCHROME1", pixels=4095 - stored, transfer_syntax=ts))
    assert m1.photometric == "MONOCHROME1"
    np.testing.assert_allclose(m1.pixels, m2.pixels, atol=1e-6)  # same anatomy → same MONOCHROME2 picture


def test_rescale_then_window():
    """Modality rescale first, then the window (in modality units), output scaled to [0, 1]."""
    stored = pattern_pixels(64, 64, 12)
    slope, intercept, centre, width = 2.0, -1000.0, 3096.0, 2000.0
    img = decode_dicom(make_dicom(bits=12, pixels=stored, rescale=(slope, intercept), window=(centre, width)))
    hu = stored.astype(np.float64) * slope + intercept
    expected = np.clip((hu - (centre - 0.5)) / (width - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(img.pixels, expected, atol=1e-3)
    assert (img.pixels == 0).any() and (img.pixels == 1).any()  # the window really clips


def test_rescale_alone_is_linear():
    stored = pattern_pixels(32, 32, 16)
    plain = decode_dicom(make_dicom(bits=16, rows=32, cols=32, pixels=stored))
    rescaled = decode_dicom(make_dicom(bits=16, rows=32, cols=32, pixels=stored, rescale=(0.5, -1024.0)))
    np.testing.assert_allclose(plain.pixels, rescaled.pixels, atol=1e-6)


def test_window_with_monochrome1():
    stored = pattern_pixels(32, 32, 12)
    img = decode_dicom(make_dicom(bits=12, rows=32, cols=32, photometric="MONOCHROME1", pixels=stored, window=(2048, 1024)))
    expected = 1 - np.clip((stored - 2047.5) / 1023 + 0.5, 0, 1)
    np.testing.assert_allclose(img.pixels, expected, atol=1e-3)


@pytest.mark.parametrize("bits", [8, 10, 12, 14, 16])
def test_bits_stored_range(bits):
    img = decode_dicom(make_dicom(bits=bits, rows=16, cols=16))
    assert img.bits_stored == bits
    np.testing.assert_allclose(img.pixels, _unit(pattern_pixels(16, 16, bits)), atol=1e-6)


def test_signed_16bit_pixels():
    stored = (pattern_pixels(16, 16, 16).astype(np.int32) - 32768).astype(np.int16)
    img = decode_dicom(make_dicom(bits=16, rows=16, cols=16, pixels=stored, signed=True))
    np.testing.assert_allclose(img.pixels, _unit(stored), atol=1e-6)


def test_dx_via_sop_class_and_missing_view_warn():
    img = decode_dicom(make_dicom(modality=None, sop_class_uid=DX_SOP_CLASS, view=None, body_part=None))
    assert img.modality == "DX" and img.view is None
    assert any("SOP Class" in w for w in img.warnings)
    assert any("ViewPosition missing" in w for w in img.warnings)


def test_dx_and_ap_accepted_path_and_stream_sources(tmp_path):
    data = make_dicom(modality="DX", view="AP", transfer_syntax=RLELossless)
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    a, b, c = decode_dicom(data), decode_dicom(path), decode_dicom(io.BytesIO(data))
    assert a.modality == "DX" and a.view == "AP"
    np.testing.assert_array_equal(a.pixels, b.pixels)
    np.testing.assert_array_equal(a.pixels, c.pixels)


def test_patient_fields_kept_apart_and_out_of_repr():
    img = decode_dicom(make_dicom())
    assert img.patient["patient_name"] == FAKE_PATIENT_NAME
    assert FAKE_PATIENT_NAME not in repr(img)
    assert FAKE_PATIENT_NAME not in str(img.dicom_meta)


def test_prepare_image_shape_range_determinism():
    pixels = decode_dicom(make_dicom(rows=300, cols=240)).pixels
    a = prepare_image(pixels, 128)
    b = prepare_image(pixels, 128)
    assert a.shape == (1, 128, 128) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    assert prepare_image(np.full((50, 70), 0.25, np.float32), 64) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        prepare_image(np.zeros((2, 3, 4)), 64)


def test_load_png_8bit_16bit_rgb(tmp_path):
    g8 = (pattern_pixels(40, 30, 8)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(g8, mode="L").save(buf, format="PNG")
    img = load_png(buf.getvalue())
    np.testing.assert_allclose(img.pixels, g8 / 255.0, atol=1e-6)
    assert img.shape == (40, 30)

    g16 = pattern_pixels(20, 20, 16)
    p16 = tmp_path / "x16.png"
    Image.fromarray(g16.astype(np.uint16)).save(p16)
    np.testing.assert_allclose(load_png(p16).pixels, _unit(g16), atol=1e-6)

    rgb = np.stack([g8, g8, g8], axis=-1)
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="JPEG", quality=95)
    jpg = load_png(buf.getvalue())
    assert jpg.shape == (40, 30) and not jpg.warnings
    with pytest.raises(ImageRefused) as exc:
        load_png(b"definitely not an image")
    assert exc.value.code == "not-image"


def test_voi_lut_sequence_applied():
    """A VOI LUT Sequence (here an inverting 16-bit LUT over 12-bit input) takes precedence over the window."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    stored = pattern_pixels(32, 32, 12)
    ds = pydicom.dcmread(io.BytesIO(make_dicom(bits=12, rows=32, cols=32, pixels=stored, window=(100, 10))))
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = [65535 - 16 * v for v in range(4096)]
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = Sequence([item])
    buf = io.BytesIO()
    ds.save_as(buf)
    img = decode_dicom(buf.getvalue())
    np.testing.assert_allclose(img.pixels, (65535 - 16 * stored.astype(np.float64)) / 65535.0, atol=1e-6)
    assert img.dicom_meta["has_voi_lut"]
