"""Every refusal of the image-input contract, with its code and a reason that says what was expected."""
from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pydicom
import pytest
from dicom_factory import FAKE_PATIENT_ID, FAKE_PATIENT_NAME, JPEG2000Lossless, RLELossless, make_dicom, rewrap_as_chest
from PIL import Image

from models.preprocessing import DecodedImage, ImageRefused, decode_dicom


def _refusal(source, **kw) -> ImageRefused:
    with pytest.raises(ImageRefused) as exc:
        decode_dicom(source, **kw)
    err = exc.value
    assert err.reason and len(err.reason) > 15
    assert FAKE_PATIENT_NAME not in err.reason and FAKE_PATIENT_ID not in err.reason  # no PHI in reasons
    return err


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


CASES = {
    "ct": (dict(modality="CT"), "wrong-modality", ["CT", "CR or DX"]),
    "mr": (dict(modality="MR"), "wrong-modality", ["MR", "CR or DX"]),
    "us": (dict(modality="US"), "wrong-modality", ["US", "CR or DX"]),
    "ot": (dict(modality="OT"), "wrong-modality", ["OT", "CR or DX"]),
    "rgb": (dict(photometric="RGB", bits=8), "colour-image", ["RGB", "MONOCHROME"]),
    "ybr": (dict(photometric="YBR_FULL", bits=8), "colour-image", ["YBR_FULL", "MONOCHROME"]),
    "multi-frame": (dict(frames=3), "multi-frame", ["3 frames", "single-frame"]),
    "abdomen": (dict(body_part="ABDOMEN"), "not-chest", ["ABDOMEN", "CHEST"]),
    "knee": (dict(body_part="KNEE"), "not-chest", ["KNEE", "CHEST"]),
    "lateral-ll": (dict(view="LL"), "lateral-view", ["LL", "PA or AP"]),
    "lateral-rl": (dict(view="RL"), "lateral-view", ["RL", "PA or AP"]),
    "lateral-word": (dict(view="LATERAL"), "lateral-view", ["LATERAL", "PA or AP"]),
    "oblique": (dict(view="OBL"), "not-frontal", ["OBL", "PA or AP"]),
    "no-pixel-data": (dict(pixel_data=False), "no-pixel-data", ["Pixel Data"]),
    "bits-6": (dict(bits=6), "bits-stored", ["BitsStored 6", "8–16"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_header_refusals(name):
    kwargs, code, words = CASES[name]
    err = _refusal(make_dicom(**kwargs))
    assert err.code == code, err.reason
    for w in words:
        assert w in err.reason
    assert "expected" in err.reason


def test_decompression_bomb_refused_from_header_without_allocating():
    data = make_dicom(rows=30000, cols=30000, bits=16, fake_pixel_bytes=b"\0" * 128)
    tracemalloc.start()
    try:
        err = _refusal(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.code == "too-many-pixels"
    assert "30000 x 30000" in err.reason and "limit" in err.reason
    assert peak < 20 * 1024 * 1024  # 30000² × 2 bytes would be 1.8 GB


def test_pixel_limit_is_configurable(cxr_env, monkeypatch):
    data = make_dicom(rows=64, cols=64)
    assert _refusal(data, max_pixels=64 * 64 - 1).code == "too-many-pixels"
    assert decode_dicom(data, max_pixels=64 * 64).shape == (64, 64)
    from core.config import reset_settings

    monkeypatch.setenv("CXR_MAX_IMAGE_PIXELS", "1000")
    reset_settings()
    assert _refusal(data).code == "too-many-pixels"  # default from get_settings().max_image_pixels


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00" * 10, b"hello, this is not a DICOM file at all" * 20, _png_bytes(), b"\0" * 128 + b"DICX" + b"\1" * 64],
    ids=["empty", "tiny", "text", "png", "bad-magic"],
)
def test_not_dicom(data):
    err = _refusal(data)
    assert err.code == "not-dicom"
    assert "expected a DICOM" in err.reason


@pytest.mark.parametrize("ts", ["1.2.840.10008.1.2.1", RLELossless, JPEG2000Lossless], ids=["native", "rle", "j2k"])
@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.995])
def test_truncated(ts, fraction):
    data = make_dicom(transfer_syntax=ts)
    cut = data[: max(int(len(data) * fraction), 140)]
    err = _refusal(cut)
    assert err.code in {"truncated", "not-dicom"}, err.reason
    if fraction >= 0.5:
        assert err.code == "truncated"


def test_undecodable_names_the_transfer_syntax():
    """A 12-bit JPEG Extended file that pylibjpeg, gdcm and Pillow all fail on."""
    err = _refusal(rewrap_as_chest("JPEG-lossy.dcm"))
    assert err.code == "undecodable"
    assert "JPEG Extended (Process 2 and 4)" in err.reason


def test_corrupt_codestream_is_undecodable():
    ds = pydicom.dcmread(io.BytesIO(make_dicom(transfer_syntax=JPEG2000Lossless)))
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x13" * 400])
    buf = io.BytesIO()
    ds.save_as(buf)
    err = _refusal(buf.getvalue())
    assert err.code == "undecodable" and "JPEG 2000" in err.reason


def test_io_problems(tmp_path):
    assert _refusal(tmp_path / "missing.dcm").code == "not-found"
    assert _refusal(tmp_path).code == "not-a-file"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fuzzed_files_never_escape_as_other_exceptions():
    """Random byte corruption of valid files: each either decodes or is refused — nothing else."""
    rng = np.random.default_rng(7)
    bases = [make_dicom(rows=32, cols=32), make_dicom(rows=32, cols=32, transfer_syntax=RLELossless),
             make_dicom(rows=32, cols=32, transfer_syntax=JPEG2000Lossless)]
    outcomes = set()
    for i in range(150):
        data = bytearray(bases[i % 3])
        for pos in rng.integers(128, len(data), size=int(rng.integers(1, 12))):
            data[pos] = int(rng.integers(0, 256))
        try:
            res = decode_dicom(bytes(data), max_pixels=10_000_000)
            assert isinstance(res, DecodedImage) and np.isfinite(res.pixels).all()
            assert 0.0 <= res.pixels.min() and res.pixels.max() <= 1.0
            outcomes.add("accepted")
        except ImageRefused as exc:
            assert exc.code and exc.reason
            outcomes.add(exc.code)
    assert len(outcomes) >= 2
