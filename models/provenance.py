"""Does a dataset count as external validation for a model? Decided by provenance, not by name.

``external_status(training_manifest, evaluated_manifest)`` compares two dataset manifests (pandas
DataFrames as ``cxr data import`` writes them) and returns::

    {"is_external": bool, "reasons": [...],            # why not, one line each (empty when external)
     "shared_sources": [...], "shared_origins": [...], "shared_sites": [...],
     "exact_duplicate_images": int, "near_duplicate_images": int, "near_duplicate_max_distance": int,
     "unknown_site_images": int, "checked": [...], "method": "..."}

A dataset is external only when ALL hold:
- its ``source`` values (the collection / provider declared at import) are disjoint from the
  training data's, and so are its ``origin`` values (per-image publisher, e.g. the web host a
  public collection's image came from) where recorded;
- its known ``site`` values are disjoint from the training data's (rows with an unknown site
  cannot share a *named* site; they are counted and reported, since "unknown" proves nothing);
- it shares no image with the training data: no equal ``image_hash`` (exact) and no perceptual
  hash (``phash``, 64-bit, hex) within ``NEAR_DUPLICATE_DISTANCE`` bits (near duplicate: the same
  radiograph re-encoded, resized, cropped slightly or re-windowed).
A manifest without ``phash`` (imported before near-duplicate detection) cannot be checked for near
duplicates: that alone makes the dataset internal ("cannot verify"), never silently external.

Pure: no project imports (models/ must not import app, compliance or pipelines).
"""
from __future__ import annotations

from typing import Any

import numpy as np

NEAR_DUPLICATE_DISTANCE = 6  # Hamming bits of the 64-bit pHash; measured on the public collection (README)
UNKNOWN = {"", "unknown", "nan", "none"}
METHOD = ("external iff sources, origins and named sites are disjoint from the training data and no image "
          f"is an exact (content hash) or near duplicate (pHash Hamming <= {NEAR_DUPLICATE_DISTANCE}) of a "
          "training image")


def _values(df, column: str) -> set[str]:
    if df is None or column not in df:
        return set()
    return {str(v).strip() for v in df[column].tolist() if str(v).strip().lower() not in UNKNOWN}


def phash_bits(hexes) -> np.ndarray:
    """Hex pHash strings (16 hex digits) → uint64 array; blanks → 0 with a mask via ``phash_valid``."""
    out = np.zeros(len(hexes), dtype=np.uint64)
    for i, h in enumerate(hexes):
        h = str(h or "").strip()
        if len(h) == 16:
            try:
                out[i] = np.uint64(int(h, 16))
            except ValueError:
                pass
    return out


def phash_valid(hexes) -> np.ndarray:
    return np.array([len(str(h or "").strip()) == 16 for h in hexes], dtype=bool)


_POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between two uint64 arrays: (len(a), len(b)) uint8."""
    x = np.bitwise_xor(a[:, None], b[None, :])
    return _POP8[x.view(np.uint8).reshape(*x.shape, 8)].sum(axis=-1, dtype=np.uint8)


def near_pairs(a_hex, b_hex=None, max_distance: int = NEAR_DUPLICATE_DISTANCE,
               block: int = 2048) -> list[tuple[int, int, int]]:
    """(i, j, distance) for pHashes within ``max_distance`` bits. Within one list (``b_hex`` None):
    i < j only. Blocked O(n·m) numpy; fine to ~50k images (a BK-tree would be the next step)."""
    a = phash_bits(a_hex)
    va = phash_valid(a_hex)
    same = b_hex is None
    b = a if same else phash_bits(b_hex)
    vb = va if same else phash_valid(b_hex)
    out: list[tuple[int, int, int]] = []
    for i0 in range(0, len(a), block):
        d = hamming(a[i0:i0 + block], b).astype(int)
        ok = (d <= max_distance) & va[i0:i0 + block, None] & vb[None, :]
        for i, j in zip(*np.nonzero(ok)):
            gi = i0 + int(i)
            if same and int(j) <= gi:
                continue
            out.append((gi, int(j), int(d[i, j])))
    return out


def external_status(training, evaluated, *, max_distance: int = NEAR_DUPLICATE_DISTANCE) -> dict[str, Any]:
    """Provenance verdict for ``evaluated`` as external validation of a model trained on ``training``."""
    reasons: list[str] = []
    res: dict[str, Any] = {"is_external": False, "reasons": reasons, "method": METHOD,
                           "near_duplicate_max_distance": max_distance,
                           "checked": ["source", "origin", "site", "exact-duplicate", "near-duplicate"]}
    if training is None:
        reasons.append("the training dataset's manifest is not available here: provenance cannot be verified")
        return res
    for col, key, what in (("source", "shared_sources", "source"), ("origin", "shared_origins", "image origin"),
                           ("site", "shared_sites", "site")):
        shared = sorted(_values(training, col) & _values(evaluated, col))
        res[key] = shared
        if shared:
            more = f" (+{len(shared) - 5} more)" if len(shared) > 5 else ""
            reasons.append(f"shares {what}(s) with the training data: {', '.join(shared[:5])}{more}")
    site_col = evaluated["site"] if "site" in evaluated else None
    res["unknown_site_images"] = 0 if site_col is None else int(
        sum(str(v).strip().lower() in UNKNOWN for v in site_col.tolist()))
    exact = set(evaluated.get("image_hash", [])) & set(training.get("image_hash", []))
    exact.discard("")
    res["exact_duplicate_images"] = len(exact)
    if exact:
        reasons.append(f"{len(exact)} image(s) identical to training images (same content hash)")
    if "phash" not in evaluated or "phash" not in training:
        res["near_duplicate_images"] = None
        reasons.append("a manifest has no perceptual hash (imported before near-duplicate detection): "
                       "near duplicates cannot be ruled out; re-import to check")
    else:
        pairs = near_pairs(evaluated["phash"].tolist(), training["phash"].tolist(), max_distance)
        ev_hash = evaluated["image_hash"].tolist() if "image_hash" in evaluated else [""] * len(evaluated)
        near = {i for i, _, _ in pairs if ev_hash[i] not in exact}
        res["near_duplicate_images"] = len(near)
        if near:
            reasons.append(f"{len(near)} image(s) near-duplicate of training images (pHash distance <= "
                           f"{max_distance})")
    res["is_external"] = not reasons
    return res
