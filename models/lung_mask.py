"""A documented, fixed lung-field mask for frontal (PA/AP) chest radiographs, and the two masked tests.

The mask is two ellipses in normalised image coordinates (x = column / width, y = row / height, image
left = patient's right), chosen to cover the lung fields of a typical adult frontal film framed as the
prepared (square, resized) arrays are:

    right lung (image left):  centre (x 0.30, y 0.46), semi-axes (0.19, 0.33)
    left lung (image right):  centre (x 0.70, y 0.46), semi-axes (0.19, 0.33)

so it spans x 0.11–0.49 / 0.51–0.89 and y 0.13–0.79. It leaves the image border (burned-in text,
laterality markers, collimation edges, the corners where devices print their labels), the neck, the
upper abdomen and most of the mediastinum outside. It is deliberately generous — a film with smaller
lungs loses some soft tissue too — because the question is whether evidence OUTSIDE the lungs
suffices, and it is fixed (not segmented) so the test has no model of its own to fail.

- ``mask_lungs(image)``: the lung fields replaced by their own mean intensity (structure removed,
  overall brightness kept, so the network sees no new hard edge of an unusual value); the border
  untouched — "what can the model see without the lungs?"
- ``keep_lungs(image)``: the reverse — everything outside the lung fields replaced by its mean.
"""
from __future__ import annotations

import numpy as np

LUNG_ELLIPSES = (((0.30, 0.46), (0.19, 0.33)), ((0.70, 0.46), (0.19, 0.33)))


def lung_field_mask(height: int, width: int | None = None) -> np.ndarray:
    """bool (height, width): True inside the fixed lung fields."""
    width = height if width is None else width
    y = (np.arange(height, dtype=np.float64) + 0.5)[:, None] / height
    x = (np.arange(width, dtype=np.float64) + 0.5)[None, :] / width
    mask = np.zeros((height, width), dtype=bool)
    for (cx, cy), (ax, ay) in LUNG_ELLIPSES:
        mask |= ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0
    return mask


def _fill(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    arr = np.array(image, dtype=np.float32, copy=True)
    view = arr.reshape(-1, *arr.shape[-2:])
    for plane in view:
        if region.any():
            plane[region] = float(plane[region].mean())
    return arr


def mask_lungs(image: np.ndarray) -> np.ndarray:
    """(…, H, W) → same shape with the lung fields blanked to their mean (border kept)."""
    image = np.asarray(image)
    return _fill(image, lung_field_mask(image.shape[-2], image.shape[-1]))


def keep_lungs(image: np.ndarray) -> np.ndarray:
    """(…, H, W) → same shape with everything outside the lung fields blanked to its mean."""
    image = np.asarray(image)
    return _fill(image, ~lung_field_mask(image.shape[-2], image.shape[-1]))
