"""One intensity normalisation for every input format (DICOM, 8-bit PNG/JPEG, 16-bit PNG).

Why: the decoders map stored values to [0, 1] differently by format — DICOM without a VOI window
and 16-bit PNG min–max, 8-bit PNG/JPEG ``/255``, windowed DICOM through its window — so the same
radiograph arrives with a different black level and gain depending on how its source hospital
exported it. A network learns that fingerprint (the source) instead of the disease.

``robust_window(pixels)``: after decoding (and after the DICOM Modality LUT, VOI LUT/window and
MONOCHROME1 inversion), map the 0.5th percentile to 0 and the 99.5th percentile to 1, clip to
[0, 1]. It is invariant to any increasing affine rescaling of the input (``a * x + b``, ``a > 0``), so
``/255``, min–max and an 8 → 16 bit re-export give the same array up to quantisation.

Windowed DICOM: the VOI window (or VOI LUT) is the display the modality or radiologist chose, so it
is applied first (at decode) and kept; when it saturates more than 0.5 % of the pixels at each end —
the usual case — the percentiles are 0 and 1 and this step is the identity. It only removes what a
window leaves (offset, unused range). An image with (almost) no contrast — percentile range below
``MIN_RANGE`` — is returned unchanged (clipped): stretching noise would invent contrast.
"""
from __future__ import annotations

import numpy as np

LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5
MIN_RANGE = 1e-3


def robust_window(pixels: np.ndarray, low: float = LOW_PERCENTILE, high: float = HIGH_PERCENTILE) -> np.ndarray:
    """float32 array in [0, 1]: ``(x - P_low) / (P_high - P_low)`` clipped; same shape as ``pixels``."""
    arr = np.asarray(pixels, dtype=np.float32)
    lo, hi = np.percentile(arr, [low, high])
    if not np.isfinite(lo) or not np.isfinite(hi) or hi - lo < MIN_RANGE:
        return np.clip(arr, 0.0, 1.0).astype(np.float32)
    return np.clip((arr - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0).astype(np.float32)
