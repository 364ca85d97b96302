"""Reduced-resolution JPEG 2000 decoding (issue #18): exactness of the decoder, choice of level,
fallbacks, refusals unchanged, and fidelity against the full decode.

Fidelity tolerance (stated): for 12- and 16-bit JPEG 2000 lossless and lossy chest phantoms of
2048 x 2048 and 2048 x 1536, with a VOI window and without one (min-max scaling), the prepared (1, 256, 256) array of the reduced path
has PSNR ≥ 40 dB against full decode + the same resize (peak 1.0), and a small trained model's
P(covid19) differs by ≤ 0.02 from the same stored pixels sent uncompressed.
"""
from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from dicom_factory import JPEG2000, ExplicitVRLittleEndian, JPEG2000Lossless, make_dicom, pattern_pixels
from pydicom.encaps import generate_frames

from models import j2k
from models.preprocessing import (
    REDUCED_DECODE_OVERSAMPLE,
    ImageRefused,
    decode_and_prepare,
    decode_dicom,
    prepare_image,
)

CLASSES = ["covid19", "other_pneumonia", "normal"]


def _codestream(data: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    return j2k.codestream_of(next(generate_frames(ds.PixelData, number_of_frames=1)))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


# ------------------------------------------------------------------------------------------ decoder
@pytest.mark.parametrize("bits,signed,ts,shape", [
    (8, False, JPEG2000Lossless, (61, 77)),
    (12, False, JPEG2000Lossless, (64, 64)),
    (12, True, JPEG2000Lossless, (61, 77)),
    (16, False, JPEG2000Lossless, (61, 77)),
    (16, True, JPEG2000Lossless, (40, 33)),
    (12, False, JPEG2000, (61, 77)),
    (10, True, JPEG2000, (50, 41)),
])
def test_level0_equals_pydicom_pixel_array(bits, signed, ts, shape):
    """At k = 0 the Pillow path undoes Pillow's 16-bit scaling and signed offset exactly."""
    stored = pattern_pixels(*shape, bits)
    if signed:
        stored = (stored.astype(np.int32) - 2 ** (bits - 1)).astype(np.int16)
    data = make_dicom(rows=shape[0], cols=shape[1], bits=bits, transfer_syntax=ts, pixels=stored, signed=signed)
    cs = _codestream(data)
    header = j2k.parse_header(cs)
    assert (header.height, header.width, header.precision, header.signed, header.components) == (*shape, bits, signed, 1)
    got = j2k.decode_reduced(cs, header, 0)
    np.testing.assert_array_equal(got, pydicom.dcmread(io.BytesIO(data)).pixel_array.astype(np.int32))
    one = j2k.decode_reduced(cs, header, 1)
    assert one.shape == (-(-shape[0] // 2), -(-shape[1] // 2))


def test_choose_reduction_respects_min_side_levels_and_pillow_sizing():
    h = j2k.J2KHeader(width=2048, height=2048, x_offset=0, y_offset=0, components=1, precision=12, signed=False,
                      levels=5, subsampled=False)
    assert j2k.choose_reduction(h, 512) == 2 and j2k.reduced_shape(h, 2) == (512, 512)
    assert j2k.choose_reduction(h, 256) == 3
    assert j2k.choose_reduction(h, 4096) == 0
    assert j2k.choose_reduction(j2k.J2KHeader(**{**h.__dict__, "levels": 1}), 64) == 1
    # 1537 / 4: OpenJPEG makes 385 columns, Pillow would allocate 384 and fail -> k = 1 only
    odd = j2k.J2KHeader(width=1537, height=2001, x_offset=0, y_offset=0, components=1, precision=12, signed=False,
                        levels=5, subsampled=False)
    assert j2k.choose_reduction(odd, 300) == 1


def test_parse_header_rejects_non_codestreams():
    with pytest.raises(j2k.J2KReduceError):
        j2k.codestream_of(b"\x00" * 64)
    with pytest.raises(j2k.J2KReduceError):
        j2k.parse_header(b"\xff\x4f\xff\x51\x00")


def test_odd_sized_image_decodes_reduced_at_a_level_pillow_can_size():
    stored = pattern_pixels(601, 517, 12)
    data = make_dicom(rows=601, cols=517, bits=12, transfer_syntax=JPEG2000Lossless, pixels=stored, window=(2000, 3000))
    d = decode_dicom(data, target_size=64)
    assert d.reduction >= 1 and d.shape == (-(-601 // 2 ** d.reduction), -(-517 // 2 ** d.reduction))
    assert min(d.shape) >= REDUCED_DECODE_OVERSAMPLE * 64
    assert d.dicom_meta["rows"] == 601 and d.dicom_meta["decode_reduction"] == d.reduction


# ------------------------------------------------------------------------------------ path choice
def test_path_choice_and_fallbacks():
    stored = pattern_pixels(512, 512, 12)
    windowed = make_dicom(rows=512, cols=512, bits=12, transfer_syntax=JPEG2000Lossless, pixels=stored, window=(2000, 3000))
    assert decode_dicom(windowed, target_size=64).reduction == 3  # 512 / 8 = 64
    assert decode_dicom(windowed).reduction == 0  # no target: full resolution, as before
    assert decode_dicom(windowed).shape == (512, 512)
    # no VOI transform: min-max on the reduced level (prepare_image's robust window divides its gain out)
    plain = make_dicom(rows=512, cols=512, bits=12, transfer_syntax=JPEG2000Lossless, pixels=stored)
    assert decode_dicom(plain, target_size=64).reduction == 3
    # ... unless the image has almost no contrast: the robust window would keep the min-max gain, which
    # the reduced level changes (its extremes differ) -> full decode, the same prepared array as before.
    # Two flat films, texture 1-3 stored levels: one whose maximum is a small burned-in marker, one whose
    # extremes are single hot/dead pixels (the low-pass shrinks them to a bump: at the reduced level the
    # texture is 5 % of the min-max range, at full resolution 0.07 %)
    rng = np.random.default_rng(3)
    marker = np.full((512, 512), 2000, dtype=np.uint16)
    marker[::2, ::2] += 1
    marker[200:216, 300:316] = 4095
    hot = (2000 + rng.integers(0, 4, (512, 512))).astype(np.uint16)
    hot[rng.integers(0, 512, 6), rng.integers(0, 512, 6)] = 4095
    hot[rng.integers(0, 512, 6), rng.integers(0, 512, 6)] = 0
    for flat in (marker, hot):
        flat_file = make_dicom(rows=512, cols=512, bits=12, transfer_syntax=JPEG2000Lossless, pixels=flat)
        d = decode_dicom(flat_file, target_size=64)
        assert d.reduction == 0
        np.testing.assert_array_equal(prepare_image(d, 64), prepare_image(decode_dicom(flat_file), 64))
    # not JPEG 2000 -> full decode, same pixels as without a target
    native = make_dicom(rows=512, cols=512, bits=12, pixels=stored, window=(2000, 3000))
    d = decode_dicom(native, target_size=64)
    assert d.reduction == 0
    np.testing.assert_array_equal(d.pixels, decode_dicom(native).pixels)
    # an invalid window (LINEAR width < 1) fails on the reduced pixels -> full decode + the same note
    ds = pydicom.dcmread(io.BytesIO(windowed))
    ds.WindowWidth = 0.5
    buf = io.BytesIO()
    ds.save_as(buf)
    bad = decode_dicom(buf.getvalue(), target_size=64)
    ref = decode_dicom(buf.getvalue())
    assert bad.reduction == 0 and bad.warnings == ref.warnings and any("window" in w for w in bad.warnings)
    np.testing.assert_array_equal(bad.pixels, ref.pixels)
    # a codestream that disagrees with the header (BitsStored 11 vs 12-bit codestream) -> full decode
    ds = pydicom.dcmread(io.BytesIO(windowed))
    ds.BitsStored, ds.HighBit = 11, 10
    buf = io.BytesIO()
    ds.save_as(buf)
    assert decode_dicom(buf.getvalue(), target_size=64).reduction == 0


@pytest.mark.parametrize("kwargs,code", [
    ({"frames": 2}, "multi-frame"),
    ({"photometric": "RGB", "bits": 8}, "colour-image"),
    ({"modality": "CT"}, "wrong-modality"),
    ({"view": "LL"}, "lateral-view"),
])
def test_refusals_unchanged_with_a_target(kwargs, code):
    kw = {"rows": 64, "cols": 64, "transfer_syntax": JPEG2000Lossless, "window": (100, 50)} | kwargs
    data = make_dicom(**kw)
    for target in (None, 16):
        with pytest.raises(ImageRefused) as exc:
            decode_dicom(data, target_size=target)
        assert exc.value.code == code


def test_pixel_limit_checked_before_the_reduced_decode():
    data = make_dicom(rows=256, cols=256, bits=12, transfer_syntax=JPEG2000Lossless, window=(2000, 3000))
    with pytest.raises(ImageRefused) as exc:
        decode_dicom(data, max_pixels=256 * 255, target_size=16)
    assert exc.value.code == "too-many-pixels"


def test_monochrome1_rescale_and_voi_lut_applied_on_reduced_pixels():
    """Reduced decode of a MONOCHROME1 image with rescale, and of one with a VOI LUT: same mapping as full."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:512, 0:512]
    smooth = (0.5 + 0.4 * np.sin(xx / 40.0) * np.cos(yy / 55.0) + rng.normal(0, 0.005, (512, 512)))
    stored = np.clip(np.round(smooth * 4095), 0, 4095).astype(np.uint16)
    mono1 = make_dicom(rows=512, cols=512, bits=12, photometric="MONOCHROME1", transfer_syntax=JPEG2000Lossless,
                       pixels=stored, rescale=(2.0, -1024.0), window=(3000.0, 6000.0))
    red, full = decode_and_prepare(mono1, 64)[1], decode_and_prepare(mono1, 64, reduced=False)[1]
    assert decode_dicom(mono1, target_size=64).reduction == 3
    assert _psnr(red, full) >= 40
    # bright stays bright: MONOCHROME1 was inverted on the reduced path too
    assert np.corrcoef(red.ravel(), full.ravel())[0, 1] > 0.99
    ds = pydicom.dcmread(io.BytesIO(make_dicom(rows=512, cols=512, bits=12, transfer_syntax=JPEG2000Lossless,
                                               pixels=stored)))
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = [int(65535 * (v / 4095) ** 0.7) for v in range(4096)]
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = Sequence([item])
    buf = io.BytesIO()
    ds.save_as(buf)
    d = decode_dicom(buf.getvalue(), target_size=64)
    assert d.reduction == 3 and d.dicom_meta["has_voi_lut"]
    full = decode_and_prepare(buf.getvalue(), 64, reduced=False)[1]
    aligned, unaligned = _psnr(prepare_image(d, 64), full), _psnr(prepare_image(d.pixels, 64), full)
    assert aligned >= 40 and aligned > unaligned + 3  # the half-pixel alignment of prepare_image matters


# ------------------------------------------------------------------------ float32 intensity mapping
def _reference_unit_range(arr, ds, photometric):
    """The float64 implementation this change replaced (pydicom for every step), as the oracle."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, apply_windowing

    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    out = None
    if "VOILUTSequence" in ds:
        lut_out = np.asarray(apply_voi_lut(values.round().astype(np.int64), ds, index=0, prefer_lut=True), dtype=np.float64)
        out = lut_out / float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    if out is None and "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            windowed = np.asarray(apply_windowing(values, ds, index=0), dtype=np.float64)
            bounds = np.asarray(apply_windowing(np.array([-1e12, 1e12]), ds, index=0), dtype=np.float64)
            lo, hi = float(bounds.min()), float(bounds.max())
            if hi > lo:
                out = (windowed - lo) / (hi - lo)
        except Exception:  # noqa: BLE001
            out = None
    if out is None:
        vmin, vmax = float(values.min()), float(values.max())
        out = (values - vmin) / (vmax - vmin) if vmax > vmin else np.zeros_like(values)
    out = np.clip(out, 0.0, 1.0)
    return 1.0 - out if photometric == "MONOCHROME1" else out


@pytest.mark.parametrize("changes", [
    {},
    {"WindowCenter": 2000, "WindowWidth": 1500},
    {"WindowCenter": 2000, "WindowWidth": 1, "VOILUTFunction": "LINEAR"},
    {"WindowCenter": 2000.5, "WindowWidth": 900, "VOILUTFunction": "LINEAR_EXACT"},
    {"WindowCenter": 2000, "WindowWidth": 900, "VOILUTFunction": "SIGMOID"},
    {"WindowCenter": [1500, 2500], "WindowWidth": [800, 400]},
    {"RescaleSlope": 0.5, "RescaleIntercept": -1024, "WindowCenter": 0, "WindowWidth": 1000},
    {"RescaleSlope": -1.0, "RescaleIntercept": 4095, "WindowCenter": 2000, "WindowWidth": 1500},
    {"RescaleSlope": 2.0, "RescaleIntercept": 10.0, "PhotometricInterpretation": "MONOCHROME1"},
])
def test_float32_intensity_mapping_matches_float64_reference(changes):
    from models.preprocessing import _to_unit_range

    stored = pattern_pixels(40, 48, 12, seed=2)
    ds = pydicom.dcmread(io.BytesIO(make_dicom(rows=40, cols=48, bits=12, pixels=stored)))
    for k, v in changes.items():
        setattr(ds, k, v)
    photometric = str(ds.PhotometricInterpretation)
    got, _ = _to_unit_range(ds.pixel_array, ds, photometric)
    ref = _reference_unit_range(ds.pixel_array, ds, photometric)
    assert got.dtype == np.float32 and got.shape == stored.shape
    assert float(np.abs(got - ref).max()) < 1e-5


# --------------------------------------------------------------------------------------- fidelity
@pytest.fixture(scope="module")
def phantom() -> np.ndarray:
    """A 2048 x 2048 chest phantom in [0, 1] (pipelines.synth); the non-square cases crop 2048 x 1536."""
    from pipelines.synth import _anatomy, render_chest

    rng = np.random.default_rng(18)
    return render_chest(rng, 2048, 2048, "covid19", 0.5, _anatomy(rng))


@pytest.fixture(scope="module")
def model():
    """A seeded small FusionNet (image only) as a ``ClinicalModel``, plus the spread of its logit margin.

    Untrained weights give nearly equal, far-from-0.5 probabilities for every image, which would make
    a "≤ 0.02" check vacuous. So P(covid19) is read at the model's most sensitive point: ``_p_covid``
    centres the covid19-vs-rest logit margin on the uncompressed image's margin (that image sits at
    P = 0.5, where dP/dmargin is largest) and scales it by ``spread`` = the std of the margin over
    twelve different synthetic radiographs (tests/model_fixtures.py), so that two patients' images
    differ by about one logit, as for a trained model. Each case also checks that a visible contrast
    change moves P(covid19) by more than 0.02 (the check has teeth).
    """
    import pandas as pd
    import torch
    from model_fixtures import synth_image

    from models.network import FusionNet
    from models.serving import ClinicalModel
    from models.transforms import VITAL_FIELDS, VitalsEncoder

    torch.manual_seed(0)
    net = FusionNet(encoder="small", image_size=128, n_vitals_features=16, modalities="image").eval()
    enc = VitalsEncoder.fit(pd.DataFrame({f: [1.0, 2.0] for f in VITAL_FIELDS} | {"sex": ["M", "F"]}))
    config = {"classes": CLASSES, "operating_threshold": 0.5, "temperature": 1.0, "network": net.config(),
              "vitals_encoder": enc.to_dict()}
    m = ClinicalModel(net, config)
    rng = np.random.default_rng(0)
    refs = [synth_image(CLASSES[i % 3], rng).astype(np.float32) for i in range(12)]
    spread = float(np.std(_margin(m, refs)))
    assert spread > 0
    return m, spread


def _margin(m, images) -> np.ndarray:
    """covid19-vs-rest logit margin log(p0 / (p1 + p2)) per image, from ``ClinicalModel.logits``."""
    logits = m.logits(list(images), [{}] * len(images))
    return logits[:, 0] - np.log(np.exp(logits[:, 1:]).sum(axis=1))


def _p_covid(model, image: np.ndarray, reference: np.ndarray) -> float:
    """P(covid19) with the margin centred on ``reference`` (→ 0.5) and scaled by the spread."""
    m, spread = model
    a, b = _margin(m, [image, reference])
    return float(1.0 / (1.0 + np.exp(-(a - b) / spread)))


@pytest.mark.parametrize("voi", ["window", "none"])
@pytest.mark.parametrize("shape", [(2048, 2048), (2048, 1536)], ids=["2048sq", "2048x1536"])
@pytest.mark.parametrize("ts", [JPEG2000Lossless, JPEG2000], ids=["lossless", "lossy"])
@pytest.mark.parametrize("bits", [12, 16])
def test_reduced_path_fidelity(phantom, model, bits, ts, shape, voi):
    """``voi="none"``: no window, so min-max scaling on the reduced level's extremes; the phantom then
    carries a burned-in full-white marker (as CR films do), the extreme a low-pass softens most."""
    rows, cols = shape
    img = phantom[:rows, (2048 - cols) // 2:(2048 - cols) // 2 + cols]
    maxv = 2**bits - 1
    stored = np.round((0.05 + 0.9 * img) * maxv).astype(np.uint16)
    lo, hi = np.percentile(stored, [0.5, 99.5])
    extra: dict = {"window": ((lo + hi) / 2, hi - lo)}
    if voi == "none":
        stored[100:160, 100:140] = maxv
        extra = {}
    if cols != rows and bits == 16:  # also MONOCHROME1 + rescale on the non-square 16-bit cases
        stored = (maxv - stored).astype(np.uint16)
        extra = {"photometric": "MONOCHROME1", "rescale": (0.5, -100.0)}
        if voi == "window":
            extra["window"] = (0.5 * (maxv - (lo + hi) / 2) - 100.0, 0.5 * (hi - lo))
    j2k_file = make_dicom(rows=rows, cols=cols, bits=bits, transfer_syntax=ts, pixels=stored, **extra)
    native = make_dicom(rows=rows, cols=cols, bits=bits, transfer_syntax=ExplicitVRLittleEndian, pixels=stored, **extra)

    decoded, reduced = decode_and_prepare(j2k_file, 256)
    k = 3 if cols == 2048 else 2  # 1536 / 8 = 192 < 256: one level less
    assert decoded.reduction == k and decoded.shape == (rows // 2**k, cols // 2**k)  # really the reduced path
    _, full = decode_and_prepare(j2k_file, 256, reduced=False)
    _, plain = decode_and_prepare(native, 256)
    assert reduced.shape == full.shape == plain.shape == (1, 256, 256) and reduced.dtype == np.float32
    if ts == JPEG2000Lossless:
        np.testing.assert_array_equal(full, plain)  # lossless full decode = the uncompressed pixels

    assert _psnr(reduced, full) >= 40.0

    p_plain, p_reduced = _p_covid(model, plain, plain), _p_covid(model, reduced, plain)
    assert p_plain == pytest.approx(0.5, abs=1e-4)
    assert abs(p_reduced - p_plain) <= 0.02, (p_plain, p_reduced)
    # the check has teeth: the same model moves P(covid19) by more than 0.02 for a visible contrast change
    p_other = _p_covid(model, np.clip(plain * 1.15 - 0.05, 0, 1), plain)
    assert abs(p_other - p_plain) > 0.02, (p_plain, p_other)
