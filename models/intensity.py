"""One intensity normalisation for every input format (DICOM, 8-bit PNG/JPEG, 16-bit PNG).

Why: the decoders map stored values to [0, 1] differently by format — DICOM without a VOI window
and 16-bit PNG min–max, 8-bit PNG/JPEG ``/255``, windowed DICOM through its window — so the same
radiograph arrives with a different black level and gain depending on how its source hospital
exported it. A network learns that fingerprint (the source) instead of the disease.

``robust_window(pixels)``: after decoding (and after the DICOM Modality LUT, VOI LUT/window and
MONOCHROME1 inversion), map the 0.5th percentile to 0 and the 99.5th percentile to 1, clip to
[0, 1] (the percentiles read on 4 x 4 block means, see ``_block_mean``). It is invariant to any
increasing affine rescaling of the input (``a * x + b``, ``a > 0``), so
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


BLOCK = 4  # percentiles are read on 4 x 4 block means of the prepared array


def _block_mean(arr: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """4 x 4 block means (the array as is when it is smaller). The window is estimated on the image's
    low frequencies: two decodes of one radiograph (full resolution + resize, or a reduced JPEG 2000
    level) agree there to within quantisation, while their last-pixel details differ; the tail
    percentiles of the raw pixels would carry that difference into every pixel's gain."""
    h, w = arr.shape[-2:]
    if arr.ndim != 2 or h < 4 * block or w < 4 * block:
        return arr
    h2, w2 = h - h % block, w - w % block
    return arr[:h2, :w2].reshape(h2 // block, block, w2 // block, block).mean(axis=(1, 3))


def percentile_window(pixels: np.ndarray, low: float = LOW_PERCENTILE, high: float = HIGH_PERCENTILE
                      ) -> tuple[float, float]:
    """(P_low, P_high) of ``pixels`` (H, W), read on its 4 x 4 block means: the window ``robust_window``
    maps to [0, 1]; it leaves the pixels as they are when ``P_high - P_low < MIN_RANGE``."""
    lo, hi = np.percentile(_block_mean(np.asarray(pixels, dtype=np.float32)), [low, high])
    return float(lo), float(hi)


def robust_window(pixels: np.ndarray, low: float = LOW_PERCENTILE, high: float = HIGH_PERCENTILE) -> np.ndarray:
    """float32 array in [0, 1]: ``(x - P_low) / (P_high - P_low)`` clipped; same shape as ``pixels``."""
    arr = np.asarray(pixels, dtype=np.float32)
    lo, hi = percentile_window(arr, low, high)
    if not np.isfinite(lo) or not np.isfinite(hi) or hi - lo < MIN_RANGE:
        return np.clip(arr, 0.0, 1.0).astype(np.float32)
    return np.clip((arr - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0).astype(np.float32)
