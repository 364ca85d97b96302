"""One intensity normalisation for every format: the same radiograph as 8-bit PNG, 16-bit PNG and DICOM
(no window; and with a VOI window that clips nothing) gives the same prepared array (issue 14, item 4)."""
from __future__ import annotations

import io

import numpy as np
import pytest

from models.intensity import robust_window
from models.preprocessing import decode_dicom, load_png, prepare_image


def _radiograph() -> np.ndarray:
    from pipelines.synth import _anatomy, render_chest

    rng = np.random.default_rng(3)
    return render_chest(rng, 256, 256, "covid19", 0.8, _anatomy(rng), noise=0.01)


def _png(arr: np.ndarray, mode: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(arr) if mode == "L" else Image.frombytes("I;16", arr.shape[::-1], arr.astype("<u2").tobytes())
    img.save(buf, format="PNG")
    return buf.getvalue()


def _dicom(stored: np.ndarray, bits: int, **extra) -> bytes:
    from pipelines.synth import encode_dicom

    header = {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.1", "SOPInstanceUID": "1.2.826.0.1.3680043.8.498.77",
              "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.78", "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.79",
              "Modality": "CR", "BodyPartExamined": "CHEST", "ViewPosition": "PA", "BitsStored": bits,
              "PhotometricInterpretation": "MONOCHROME2", **extra}
    return encode_dicom(stored, header, "ExplicitVRLittleEndian")


def test_same_radiograph_same_prepared_array_across_formats():
    x = _radiograph()
    png8 = load_png(_png(np.round(x * 255).astype(np.uint8), "L"))
    # a 16-bit export that does not use the full range (typical): offset and gain differ from the 8-bit one
    png16 = load_png(_png(np.round(3000 + x * 40000).astype(np.uint16), "I;16"))
    dcm = decode_dicom(_dicom(np.round(200 + x * 3500).astype(np.uint16), 12))          # min–max path
    win = decode_dicom(_dicom(np.round(200 + x * 3500).astype(np.uint16), 12,            # window wider than the data
                              WindowCenter="2000", WindowWidth="5000"))
    assert png8.bits_stored == 8 and png16.bits_stored == 16
    # before the normalisation the formats differ visibly (the fingerprint this removes)
    raw = [np.asarray(d.pixels, np.float32) for d in (png8, png16, dcm, win)]
    assert max(abs(float(r.mean()) - float(raw[0].mean())) for r in raw) > 0.03
    prepared = [prepare_image(d.pixels, 128)[0] for d in (png8, png16, dcm, win)]
    ref = prepared[1]
    for name, p in zip(("png8", "png16", "dicom", "dicom-windowed"), prepared):
        assert p.shape == (128, 128)
        assert float(np.abs(p - ref).max()) < 0.02, name     # 8-bit quantisation after the stretch
        assert float(np.abs(p - ref).mean()) < 0.004, name


def test_robust_window_affine_invariant_and_constant_safe():
    x = _radiograph()
    a, b = robust_window(x), robust_window(0.3 * x + 0.5)
    assert np.allclose(a, b, atol=1e-5)
    assert a.min() == 0.0 and a.max() == 1.0
    assert np.all(robust_window(np.full((8, 8), 0.25, np.float32)) == pytest.approx(0.25))
