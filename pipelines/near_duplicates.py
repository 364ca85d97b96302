"""Near-duplicate images at import: perceptual hash (imagehash pHash, 64 bits) of the cached prepared
array, pairs within ``NEAR_DUPLICATE_DISTANCE`` bits linked into one split group.

Exact duplicates (same decoded pixels) are already caught by the content hash; near duplicates are
the same radiograph saved twice with a different encoding, size, crop margin or windowing — the public
COVID-19 collection has them (the same case published in two papers, a figure and its zoomed panel).
Left in different splits they leak the test set into training.

The hash is computed on the cached (1, 256, 256) float array in [0, 1], so it is what the model
sees, independent of the source format, and can be recomputed from ``arrays/`` for any dataset.
The threshold ``NEAR_DUPLICATE_DISTANCE`` (models/provenance.py) was chosen on the shared public
collection (README "Near duplicates"): distances up to 6 bits were the same picture, pairs of
different patients' radiographs rarely come closer than ~10.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from models.provenance import NEAR_DUPLICATE_DISTANCE, near_pairs

__all__ = ["NEAR_DUPLICATE_DISTANCE", "phash_of_array", "find_near_duplicate_pairs"]


def phash_of_array(arr: np.ndarray) -> str:
    """16-hex-digit pHash of a prepared image array ((1, H, W) or (H, W), values in [0, 1])."""
    import imagehash
    from PIL import Image

    a = np.asarray(arr, dtype=np.float32)
    if a.ndim == 3:
        a = a[0]
    img = Image.fromarray(np.clip(np.nan_to_num(a) * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    return str(imagehash.phash(img, hash_size=8))


def find_near_duplicate_pairs(rows: list[dict[str, Any]], *, max_distance: int = NEAR_DUPLICATE_DISTANCE,
                              existing: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Near-duplicate pairs among ``rows`` (and between ``rows`` and ``existing`` rows of earlier
    batches). Each row needs ``phash`` and ``image_hash``; pairs of identical content (exact
    duplicates, handled by the content hash) are left out. Returns dicts with ``a``/``b`` (indices:
    ``b`` into ``existing`` when ``b_existing``), ``distance``."""
    out: list[dict[str, Any]] = []
    hashes = [r.get("phash") or "" for r in rows]
    for i, j, d in near_pairs(hashes, None, max_distance):
        if rows[i].get("image_hash") != rows[j].get("image_hash"):
            out.append({"a": i, "b": j, "distance": d, "b_existing": False})
    if existing:
        for i, j, d in near_pairs(hashes, [r.get("phash") or "" for r in existing], max_distance):
            if rows[i].get("image_hash") != existing[j].get("image_hash"):
                out.append({"a": i, "b": j, "distance": d, "b_existing": True})
    return out
