"""MONAI dictionary transforms (image) and the vitals feature encoder, shared by training and serving.

Items are dicts ``{"image": <path to cached .npy | array (1, 256, 256)>, "vitals": float32 (F,),
"label": int}``.

- ``eval_transforms(size)``: load the cached array → float32 → resize to ``size`` (area
  interpolation when shrinking) → tensor. Serving uses exactly this path (``resize_image``).
- ``train_transforms(size)``: the eval path, then augmentation (training only): small affine
  (±10° rotation, ±10 % scale, ±6 % shift), gamma contrast, Gaussian noise, intensity clipped to [0, 1].
  The deterministic prefix is what ``CacheDataset`` caches.

Vitals features (``VitalsEncoder``): for each of ``VITAL_FIELDS`` the standardised value (mean/std of
the training split; 0 when missing) and a missing indicator, then ``sex`` one-hot over
``SEX_CATEGORIES``: ``2 * 6 + 4 = 16`` features. The statistics travel with the model.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

try:  # the data layer's single definition (models/preprocessing.py)
    from models.preprocessing import VITAL_FIELDS as _VF

    VITAL_FIELDS: list[str] = list(_VF)
except ImportError:  # documented order (docs/INTERFACES.md) until the module exists
    VITAL_FIELDS = ["temperature_c", "spo2_percent", "heart_rate_bpm", "respiratory_rate",
                    "systolic_bp_mmhg", "age_years"]

SEX_CATEGORIES = ["M", "F", "other", "unknown"]
N_VITALS_FEATURES = 2 * len(VITAL_FIELDS) + len(SEX_CATEGORIES)


def _num(value: Any) -> float | None:
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) or math.isinf(v) else v


def normalise_sex(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "unknown"
    s = str(value).strip().lower()
    if s in ("m", "male", "man"):
        return "M"
    if s in ("f", "female", "woman"):
        return "F"
    if s in ("o", "other"):
        return "other"
    return "unknown"


@dataclass
class VitalsEncoder:
    """Standardisation statistics (training split only) and the feature layout."""

    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    fields: list[str] = field(default_factory=lambda: list(VITAL_FIELDS))
    sex_categories: list[str] = field(default_factory=lambda: list(SEX_CATEGORIES))

    @classmethod
    def fit(cls, frame) -> "VitalsEncoder":
        mean, std = {}, {}
        for f in VITAL_FIELDS:
            vals = frame[f].astype(float).to_numpy() if f in frame else np.array([])
            vals = vals[np.isfinite(vals)]
            mean[f] = float(vals.mean()) if len(vals) else 0.0
            s = float(vals.std()) if len(vals) > 1 else 0.0
            std[f] = s if s > 1e-6 else 1.0
        return cls(mean=mean, std=std)

    @property
    def n_features(self) -> int:
        return 2 * len(self.fields) + len(self.sex_categories)

    @property
    def feature_names(self) -> list[str]:
        return ([f"{f}_z" for f in self.fields] + [f"{f}_missing" for f in self.fields]
                + [f"sex_{c}" for c in self.sex_categories])

    def to_dict(self) -> dict:
        return {"fields": self.fields, "mean": self.mean, "std": self.std, "sex_categories": self.sex_categories,
                "feature_names": self.feature_names}

    @classmethod
    def from_dict(cls, d: Mapping) -> "VitalsEncoder":
        return cls(mean=dict(d["mean"]), std=dict(d["std"]), fields=list(d["fields"]),
                   sex_categories=list(d["sex_categories"]))

    def encode(self, vitals: Mapping[str, Any] | None) -> np.ndarray:
        """One vitals mapping (any subset of the fields; None/NaN/absent = missing) → float32 (F,)."""
        vitals = vitals or {}
        n = len(self.fields)
        out = np.zeros(self.n_features, dtype=np.float32)
        for i, f in enumerate(self.fields):
            v = _num(vitals.get(f))
            if v is None:
                out[n + i] = 1.0
            else:
                out[i] = (v - self.mean[f]) / self.std[f]
        sex = normalise_sex(vitals.get("sex"))
        out[2 * n + self.sex_categories.index(sex if sex in self.sex_categories else "unknown")] = 1.0
        return out

    def encode_frame(self, frame) -> np.ndarray:
        cols = [c for c in [*self.fields, "sex"] if c in frame.columns]
        records = frame[cols].to_dict("records")
        if not records:
            return np.zeros((0, self.n_features), dtype=np.float32)
        return np.stack([self.encode(r) for r in records])


# ----------------------------------------------------------------------------------------- images
def _resize_mode(size: int, source: int = 256) -> str:
    return "area" if size <= source else "bilinear"


class LoadArrayd:
    """MONAI-style map transform: ``.npy`` path (or array) → float32 (1, H, W) numpy array."""

    def __init__(self, keys=("image",)):
        self.keys = keys

    def __call__(self, data):
        d = dict(data)
        for k in self.keys:
            v = d[k]
            arr = np.load(v, allow_pickle=False) if isinstance(v, (str, bytes)) or hasattr(v, "__fspath__") else v
            arr = np.asarray(arr, dtype=np.float32)
            if arr.ndim == 2:
                arr = arr[None]
            d[k] = np.ascontiguousarray(arr)
        return d


def eval_transforms(size: int):
    """Deterministic path: load → resize to ``size`` → tensor (no augmentation)."""
    from monai.transforms import Compose, EnsureTyped, Resized

    return Compose([
        LoadArrayd(keys=("image",)),
        Resized(keys="image", spatial_size=(size, size), mode=_resize_mode(size)),
        EnsureTyped(keys=("image", "vitals"), dtype="float32", track_meta=False),
    ])


def train_transforms(size: int):
    """Eval path + augmentation (training only; the random part runs after CacheDataset's cache)."""
    from monai.transforms import (
        Compose,
        EnsureTyped,
        RandAdjustContrastd,
        RandAffined,
        RandGaussianNoised,
        Resized,
        ScaleIntensityRanged,
    )

    return Compose([
        LoadArrayd(keys=("image",)),
        Resized(keys="image", spatial_size=(size, size), mode=_resize_mode(size)),
        EnsureTyped(keys=("image", "vitals"), dtype="float32", track_meta=False),
        RandAffined(keys="image", prob=0.7, rotate_range=(math.radians(10),), scale_range=(0.1, 0.1),
                    translate_range=(0.06 * size, 0.06 * size), padding_mode="zeros", mode="bilinear"),
        RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.8, 1.25)),
        RandGaussianNoised(keys="image", prob=0.2, mean=0.0, std=0.02),
        ScaleIntensityRanged(keys="image", a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
        EnsureTyped(keys="image", dtype="float32", track_meta=False),
    ])


_resize_cache: dict[int, Any] = {}


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Serving's image path: (1, H, W) or (H, W) array → float32 (1, size, size), same as ``eval_transforms``."""
    if size not in _resize_cache:
        _resize_cache[size] = eval_transforms(size)
    out = _resize_cache[size]({"image": image, "vitals": np.zeros(1, dtype=np.float32)})["image"]
    return np.asarray(out, dtype=np.float32)


def device_augment(img, generator=None, *, p_affine: float = 0.7, rotate_deg: float = 10.0, scale: float = 0.1,
                   shift: float = 0.06, p_gamma: float = 0.3, gamma: tuple[float, float] = (0.8, 1.25),
                   p_noise: float = 0.2, noise_std: float = 0.02):
    """Batched, on-device equivalent of ``train_transforms``' random part, for the GPU path.

    (B, 1, S, S) tensor in [0, 1] → augmented batch: random affine (±``rotate_deg``, ±``scale``,
    ±``shift`` of the side) with probability ``p_affine``, gamma contrast with ``p_gamma``, Gaussian
    noise with ``p_noise``, clipped to [0, 1]. Per-sample parameters are drawn on the CPU from
    ``generator`` (tiny), so the GPU never waits for per-image CPU work and the loader only collates
    cached tensors.
    """
    import torch
    import torch.nn.functional as F

    b, dev = img.shape[0], img.device
    u = torch.rand(b, 8, generator=generator)
    do_aff = (u[:, 0] < p_affine).float()
    ang = (u[:, 1] * 2 - 1) * math.radians(rotate_deg) * do_aff
    sx = 1 + (u[:, 2] * 2 - 1) * scale * do_aff
    sy = 1 + (u[:, 3] * 2 - 1) * scale * do_aff
    tx = (u[:, 4] * 2 - 1) * shift * 2 * do_aff
    ty = (u[:, 5] * 2 - 1) * shift * 2 * do_aff
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.stack([torch.stack([cos / sx, -sin / sx, tx], 1), torch.stack([sin / sy, cos / sy, ty], 1)], 1)
    x = img.float()
    grid = F.affine_grid(theta.to(dev), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    g = torch.where(u[:, 6] < p_gamma, gamma[0] + (u[:, 7]) * (gamma[1] - gamma[0]), torch.ones(b)).to(dev)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    rng = (x.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-7)
    x = ((x - lo) / rng).pow(g.view(b, 1, 1, 1)) * rng + lo
    noise_on = (torch.rand(b, generator=generator) < p_noise).float().to(dev).view(b, 1, 1, 1)
    x = x + noise_on * noise_std * torch.randn_like(x)
    x = x.clamp(0.0, 1.0)
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x
