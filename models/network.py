"""FusionNet: a chest-radiograph encoder (MONAI) and a vitals MLP fused into a 3-class head.

    image (B, 1, S, S) in [0, 1] ──► encoder (MONAI DenseNet121 | tiny MONAI DenseNet) ──► pool ──► proj (64)
    vitals features (B, F)       ──► MLP (F → 32 → 32)                                               ─┤
                                                                         concat ──► head ──► logits (B, 3)

Classes, in this order: ``covid19``, ``other_pneumonia``, ``normal`` (``CLASSES``).
``modalities`` selects the branches for ablations: ``("image", "vitals")`` (default),
``("image",)`` or ``("vitals",)``; an unused branch is not built and its input is ignored.

Encoders (``encoder=``):
- ``densenet121``: MONAI ``DenseNet121(spatial_dims=2, in_channels=1)`` (1024 features), trained from
  scratch (no pretrained weights);
- ``small``: a tiny MONAI ``DenseNet`` (init_features=16, growth_rate=12, 3 blocks of 2 layers), for
  CPU tests and quick experiments.

The image is normalised inside the network (``(x - 0.5) / 0.25``) so training and serving share it.
``GRADCAM_LAYER`` names the layer MONAI's GradCAM hooks (the encoder's last activation).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

CLASSES: list[str] = ["covid19", "other_pneumonia", "normal"]
ENCODERS = ("densenet121", "small")
MODALITIES = ("image", "vitals")
GRADCAM_LAYER = "image_encoder.act"


def normalise_modalities(modalities: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"image,vitals"`` / ``["vitals", "image"]`` → ``("image", "vitals")`` (canonical order)."""
    if modalities is None:
        return MODALITIES
    if isinstance(modalities, str):
        modalities = [m for m in modalities.replace(" ", "").split(",") if m]
    mods = {m.strip().lower() for m in modalities}
    unknown = mods - set(MODALITIES)
    if unknown or not mods:
        raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {sorted(modalities)}")
    return tuple(m for m in MODALITIES if m in mods)


class ImageEncoder(nn.Module):
    """MONAI DenseNet feature extractor → ReLU → global average pool → (B, n_features)."""

    def __init__(self, encoder: str = "densenet121"):
        super().__init__()
        from monai.networks.nets import DenseNet, DenseNet121

        if encoder == "densenet121":
            net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=1, pretrained=False)
        elif encoder == "small":
            net = DenseNet(spatial_dims=2, in_channels=1, out_channels=1, init_features=16, growth_rate=12,
                           block_config=(2, 2, 2), bn_size=2)
        else:
            raise ValueError(f"unknown encoder {encoder!r}: expected one of {ENCODERS}")
        self.features = net.features
        self.n_features = int(net.class_layers.out.in_features)
        self.act = nn.ReLU(inplace=False)  # GradCAM target: not in-place so backward hooks work
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.act(self.features(x))), 1)


class FusionNet(nn.Module):
    def __init__(self, encoder: str = "densenet121", image_size: int = 224, n_vitals_features: int = 16,
                 modalities: str | Sequence[str] = MODALITIES, n_classes: int = len(CLASSES),
                 image_dim: int = 64, vitals_dim: int = 32, dropout: float = 0.2):
        super().__init__()
        self.encoder_name = encoder
        self.image_size = int(image_size)
        self.n_vitals_features = int(n_vitals_features)
        self.modalities = normalise_modalities(modalities)
        fused = 0
        if "image" in self.modalities:
            self.image_encoder = ImageEncoder(encoder)
            self.image_proj = nn.Sequential(nn.Linear(self.image_encoder.n_features, image_dim), nn.ReLU())
            fused += image_dim
        if "vitals" in self.modalities:
            self.vitals_mlp = nn.Sequential(
                nn.Linear(self.n_vitals_features, vitals_dim), nn.ReLU(), nn.Dropout(dropout),
                nn.Linear(vitals_dim, vitals_dim), nn.ReLU(),
            )
            fused += vitals_dim
        self.embedding_dim = fused
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(fused, 64), nn.ReLU(), nn.Linear(64, n_classes))

    def config(self) -> dict:
        return {"encoder": self.encoder_name, "image_size": self.image_size,
                "n_vitals_features": self.n_vitals_features, "modalities": list(self.modalities)}

    def embed(self, image: torch.Tensor | None, vitals: torch.Tensor | None) -> torch.Tensor:
        """The fused embedding before the head (used for out-of-distribution scores)."""
        parts = []
        if "image" in self.modalities:
            x = (image - 0.5) / 0.25
            parts.append(self.image_proj(self.image_encoder(x)))
        if "vitals" in self.modalities:
            parts.append(self.vitals_mlp(vitals))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def forward(self, image: torch.Tensor | None, vitals: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.embed(image, vitals))


class ImageOnlyView(nn.Module):
    """``x -> net(x, vitals)`` with fixed vitals, so MONAI's GradCAM (one input) can hook the image branch."""

    def __init__(self, net: FusionNet, vitals: torch.Tensor | None):
        super().__init__()
        self.net = net
        self.vitals = vitals

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vitals = self.vitals
        if vitals is not None and vitals.shape[0] != x.shape[0]:
            vitals = vitals.expand(x.shape[0], -1)
        return self.net(x, vitals)
