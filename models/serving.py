"""The packaged model: ``ClinicalModel`` (what the hospital API calls) and its MLflow pyfunc wrapper.

Package layout (a folder, logged as the pyfunc artifact ``model_dir``)::

    weights.pt    FusionNet state_dict (float32, CPU)
    config.json   {"format": 1, "classes", "network": {encoder, image_size, n_vitals_features, modalities},
                   "input": {"cache_image_size": 256, "image": "float32 (1, 256, 256) in [0, 1] from
                   models.preprocessing.prepare_image"}, "vitals_encoder": {...mean/std...},
                   "temperature", "operating_threshold", "threshold_selection", "reference", "ood_stats",
                   "training": {dataset, dataset_version, git_commit, seed, ...}}

``ClinicalModel`` API (stable; the API package builds on it):

- attributes ``name``, ``version`` (str), ``classes`` (``["covid19", "other_pneumonia", "normal"]``),
  ``operating_threshold`` (on calibrated P(covid19)), ``temperature``, ``image_size`` (network input
  side), ``reference`` (drift statistics of the training split, see below), ``config``, ``run_id``.
- ``predict(images, vitals) -> list[dict]``: ``images`` = list of float arrays (1, 256, 256) (or
  (H, W)) in [0, 1] as ``prepare_image`` returns them; ``vitals`` = list of dicts with any of
  ``VITAL_FIELDS`` + ``sex`` (None/NaN/absent = missing; already validated by the caller). Each
  result: ``{"probabilities": {cls: p}, "p_covid19": p, "decision": "covid19-positive" |
  "covid19-negative", "ood_score": float, "ood": bool}`` — probabilities are temperature-calibrated.
- ``gradcam(image, vitals) -> np.ndarray`` (H, W) of the input image in [0, 1]: MONAI GradCAM on the
  image branch for the covid19 class (zeros for a vitals-only model).
- ``ood_score(images, vitals) -> list[float]``: mean squared z-score of the fused embedding against
  the training split; ``reference["ood"]["threshold"]`` is its 99th percentile on training.
- ``logits(images, vitals) -> np.ndarray (N, 3)``: uncalibrated.

``reference`` = ``{"vitals": {field: {"edges", "fractions", "missing_fraction"}}, "image_intensity":
{"edges", "fractions", "unit": "pixel"}, "ood": {"threshold"}}``: fractions per bin of the training
split (vitals: non-missing values; image: all pixel values of the prepared (1, 256, 256) arrays).

MLflow pyfunc (``mlflow.pyfunc.load_model("models:/covid-cxr/<v>")``): input DataFrame with
``image`` = ``encode_image(array)`` (base64 of the ``.npy`` bytes, self-describing dtype/shape),
optional ``VITAL_FIELDS`` columns (float, NaN = missing) and ``sex``; output DataFrame with
``p_covid19``, ``p_other_pneumonia``, ``p_normal``, ``decision``, ``ood_score``.
"""
from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

PACKAGE_FORMAT = 1
WEIGHTS = "weights.pt"
CONFIG = "config.json"


def encode_image(image: np.ndarray) -> str:
    """Array → base64 of its ``.npy`` bytes (the pyfunc ``image`` column)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(image), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, str):
        value = base64.b64decode(value)
    return np.load(io.BytesIO(value), allow_pickle=False)


def save_package(out_dir: Path, state_dict: Mapping[str, Any], config: dict) -> Path:
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, out_dir / WEIGHTS)
    (out_dir / CONFIG).write_text(json.dumps({"format": PACKAGE_FORMAT, **config}, indent=2))
    return out_dir


class ArtifactDigestMismatch(ValueError):
    """The model files on disk are not the ones whose digest was expected (signed)."""

    def __init__(self, path: Path, expected: str, actual: str) -> None:
        self.expected, self.actual = expected, actual
        super().__init__(f"model artefact under {path} has digest {actual[:16]}… but {expected[:16]}… was expected "
                         f"(files replaced or added since it was signed)")


def read_artifact(root: Path) -> tuple[str, dict[str, bytes]]:
    """(digest, {relative path: bytes}) of every file under ``root``, read once.

    The digest is the canonical SHA-256 over the files of the packaged model directory: SHA-256 of the
    canonical JSON list of ``[relative POSIX path, size, sha256(bytes)]`` sorted by path — weights,
    preprocessing configuration, calibration, and whatever else the artefact holds (the MLflow model
    files). Links and special files are refused (they could point outside the artefact). Loading from
    the returned bytes means the model that runs is exactly the one that was hashed.
    """
    import hashlib

    root = Path(root)
    if root.is_symlink() or not root.is_dir():
        raise FileNotFoundError(f"no model artefact folder at {root}")
    files: dict[str, bytes] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            raise ValueError(f"model artefact {root} holds a link ({rel}): refused")
        if path.is_dir():
            continue
        if not path.is_file():
            raise ValueError(f"model artefact {root} holds a special file ({rel}): refused")
        files[rel] = path.read_bytes()
    listing = [[rel, len(data), hashlib.sha256(data).hexdigest()] for rel, data in sorted(files.items())]
    digest = hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()
    return digest, files


def artifact_digest(root: Path) -> str:
    """The canonical SHA-256 of a model artefact folder (see ``read_artifact``)."""
    return read_artifact(root)[0]


def _package_in(files: Mapping[str, bytes]) -> str:
    """The relative folder ('' for the root) holding config.json + weights.pt, as ``find_package`` picks it."""
    for rel in sorted(files):
        parts = rel.rsplit("/", 1)
        folder, name = (parts[0], parts[1]) if len(parts) == 2 else ("", parts[0])
        if name == CONFIG and (f"{folder}/{WEIGHTS}" if folder else WEIGHTS) in files:
            return folder
    raise FileNotFoundError(f"no model package ({CONFIG} + {WEIGHTS}) in the artefact")


def find_package(root: Path) -> Path:
    """The folder holding ``config.json`` + ``weights.pt`` inside a downloaded MLflow model."""
    root = Path(root)
    if (root / CONFIG).exists() and (root / WEIGHTS).exists():
        return root
    for cfg in sorted(root.rglob(CONFIG)):
        if (cfg.parent / WEIGHTS).exists():
            return cfg.parent
    raise FileNotFoundError(f"no model package ({CONFIG} + {WEIGHTS}) under {root}")


class ClinicalModel:
    """A loaded model version, ready for predictions (CPU by default; thread-safe)."""

    def __init__(self, net, config: dict, *, name: str = "covid-cxr", version: str = "local",
                 run_id: str | None = None, device: str = "cpu"):
        from models.transforms import VitalsEncoder

        self.net = net.eval()
        self.config = config
        self.name = name
        self.version = str(version)
        self.run_id = run_id
        self.device = device
        self.classes: list[str] = list(config["classes"])
        self.operating_threshold = float(config["operating_threshold"])
        self.temperature = float(config["temperature"])
        # prior correction (issue 13): logits move from the class-weighted training prior back to the
        # development prevalence; absent in packages trained before it (zeros)
        offset = (config.get("prior_correction") or {}).get("logit_offset")
        self.logit_offset = np.asarray(offset if offset else [0.0] * len(self.classes), dtype=np.float64)
        self.image_size = int(config["network"]["image_size"])
        self.modalities = tuple(config["network"]["modalities"])
        self.reference: dict = config.get("reference", {})
        self.vitals_encoder = VitalsEncoder.from_dict(config["vitals_encoder"])
        ood = config.get("ood_stats") or {}
        self._ood_mean = np.asarray(ood.get("mean", []), dtype=np.float64)
        self._ood_std = np.asarray(ood.get("std", []), dtype=np.float64)
        self._lock = threading.Lock()
        self.artifact_sha256: str | None = None  # set when loaded from an artefact folder

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_directory(cls, path: str | Path, *, name: str = "covid-cxr", version: str = "local",
                       run_id: str | None = None, device: str = "cpu",
                       expected_sha256: str | None = None) -> "ClinicalModel":
        """Load the package found under ``path``. Every file under ``path`` is read once and hashed
        (``read_artifact``); with ``expected_sha256`` a different digest raises
        ``ArtifactDigestMismatch`` before anything is deserialised. ``.artifact_sha256`` is the digest."""
        import hmac

        import torch

        from models.network import FusionNet

        path = Path(path)
        digest, files = read_artifact(path)
        if expected_sha256 is not None and not hmac.compare_digest(digest, expected_sha256):
            raise ArtifactDigestMismatch(path, expected_sha256, digest)
        folder = _package_in(files)
        prefix = f"{folder}/" if folder else ""
        config = json.loads(files[prefix + CONFIG])
        if config.get("format") != PACKAGE_FORMAT:
            raise ValueError(f"unsupported model package format {config.get('format')!r} in {path / folder}")
        net = FusionNet(**config["network"])
        state = torch.load(io.BytesIO(files[prefix + WEIGHTS]), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        net.to(device)
        model = cls(net, config, name=name, version=version, run_id=run_id, device=device)
        model.artifact_sha256 = digest
        return model

    # ------------------------------------------------------------------ inputs
    def _tensors(self, images: Sequence[np.ndarray] | None, vitals: Sequence[Mapping | None]):
        import torch

        from models.transforms import resize_image

        n = len(vitals) if vitals is not None else len(images or [])
        img_t = None
        if "image" in self.modalities:
            if images is None or len(images) != n:
                raise ValueError("predict needs one image per vitals record")
            arr = np.stack([resize_image(np.asarray(im, dtype=np.float32), self.image_size) for im in images])
            img_t = torch.from_numpy(arr).to(self.device)
        vit = np.stack([self.vitals_encoder.encode(v) for v in (vitals or [None] * n)]) if n else \
            np.zeros((0, self.vitals_encoder.n_features), np.float32)
        return img_t, torch.from_numpy(vit.astype(np.float32)).to(self.device)

    def _forward(self, images, vitals) -> tuple[np.ndarray, np.ndarray]:
        import torch

        if not len(vitals if vitals is not None else images):
            return np.zeros((0, len(self.classes))), np.zeros((0, 0))
        img_t, vit_t = self._tensors(images, vitals)
        with self._lock, torch.inference_mode():
            emb = self.net.embed(img_t, vit_t)
            logits = self.net.head(emb)
        return (logits.float().cpu().numpy().astype(np.float64) + self.logit_offset,
                emb.float().cpu().numpy().astype(np.float64))

    def _ood(self, emb: np.ndarray) -> np.ndarray:
        if self._ood_mean.size == 0 or emb.size == 0:
            return np.zeros(len(emb))
        return (((emb - self._ood_mean) / self._ood_std) ** 2).mean(axis=1)

    # ------------------------------------------------------------------ public API
    def logits(self, images: Sequence[np.ndarray] | None, vitals: Sequence[Mapping | None]) -> np.ndarray:
        """Logits (N, 3) before temperature scaling (with the prior-correction offset), batched by 64."""
        out = []
        n = len(vitals)
        for i in range(0, n, 64):
            out.append(self._forward(None if images is None else images[i:i + 64], vitals[i:i + 64])[0])
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)))

    def predict(self, images: Sequence[np.ndarray] | None, vitals: Sequence[Mapping | None]) -> list[dict]:
        """Calibrated probabilities, P(covid19), decision at the operating threshold, OOD score."""
        from models.evaluate import softmax

        if vitals is None:
            vitals = [None] * len(images or [])
        results = []
        ood_thr = (self.reference.get("ood") or {}).get("threshold")
        for i in range(0, len(vitals), 64):
            logits, emb = self._forward(None if images is None else images[i:i + 64], vitals[i:i + 64])
            probs = softmax(logits, self.temperature)
            ood = self._ood(emb)
            for p, o in zip(probs, ood):
                pc = float(p[0])
                results.append({
                    "probabilities": {c: float(p[j]) for j, c in enumerate(self.classes)},
                    "p_covid19": pc,
                    "decision": "covid19-positive" if pc >= self.operating_threshold else "covid19-negative",
                    "ood_score": float(o),
                    "ood": bool(ood_thr is not None and o > ood_thr),
                })
        return results

    def ood_score(self, images: Sequence[np.ndarray] | None, vitals: Sequence[Mapping | None]) -> list[float]:
        return [r["ood_score"] for r in self.predict(images, vitals)]

    def gradcam(self, image: np.ndarray, vitals: Mapping | None = None, class_index: int = 0) -> np.ndarray:
        """Grad-CAM heat map (H, W) in [0, 1] at the input image's resolution, for ``classes[class_index]``."""
        import torch
        import torch.nn.functional as F
        from monai.visualize import GradCAM

        from models.network import GRADCAM_LAYER, ImageOnlyView

        image = np.asarray(image, dtype=np.float32)
        h, w = image.shape[-2:]
        if "image" not in self.modalities:
            return np.zeros((h, w), dtype=np.float32)
        img_t, vit_t = self._tensors([image], [vitals])
        with self._lock:
            if getattr(self, "_cam", None) is None:  # hooks are registered once, then reused
                self._cam_view = ImageOnlyView(self.net, None)
                self._cam = GradCAM(nn_module=self._cam_view, target_layers=f"net.{GRADCAM_LAYER}")
            self._cam_view.vitals = vit_t
            with torch.enable_grad():
                heat = self._cam(img_t, class_idx=class_index)  # (1, 1, S, S)
            self._cam_view.vitals = None
            self.net.zero_grad(set_to_none=True)
            self.net.eval()
        heat = heat.detach().float()
        if heat.shape[-2:] != (h, w):
            heat = F.interpolate(heat, size=(h, w), mode="bilinear", align_corners=False)
        out = heat[0, 0].cpu().numpy()
        lo, hi = float(out.min()), float(out.max())
        out = (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
        return np.clip(out, 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------- pyfunc
PYFUNC_OUTPUT_COLUMNS = ["p_covid19", "p_other_pneumonia", "p_normal", "decision", "ood_score"]


def _records_from_frame(frame) -> tuple[list[np.ndarray] | None, list[dict]]:
    from models.transforms import VITAL_FIELDS

    images = [decode_image(v) for v in frame["image"].tolist()] if "image" in frame.columns else None
    cols = [c for c in [*VITAL_FIELDS, "sex"] if c in frame.columns]
    vitals = frame[cols].to_dict("records") if cols else [{} for _ in range(len(frame))]
    return images, vitals


class CovidCxrPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc flavour around ``ClinicalModel`` (artifact ``model_dir`` = the package folder)."""

    def load_context(self, context) -> None:
        self.model = ClinicalModel.from_directory(context.artifacts["model_dir"])

    def predict(self, context, model_input, params=None):
        import pandas as pd

        images, vitals = _records_from_frame(model_input)
        results = self.model.predict(images, vitals)
        return pd.DataFrame({
            "p_covid19": [r["probabilities"]["covid19"] for r in results],
            "p_other_pneumonia": [r["probabilities"]["other_pneumonia"] for r in results],
            "p_normal": [r["probabilities"]["normal"] for r in results],
            "decision": [r["decision"] for r in results],
            "ood_score": [r["ood_score"] for r in results],
        })


def pyfunc_signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    from models.transforms import VITAL_FIELDS

    inputs = Schema([ColSpec("string", "image"), *[ColSpec("double", f, required=False) for f in VITAL_FIELDS],
                     ColSpec("string", "sex", required=False)])
    outputs = Schema([ColSpec("double", "p_covid19"), ColSpec("double", "p_other_pneumonia"),
                      ColSpec("double", "p_normal"), ColSpec("string", "decision"), ColSpec("double", "ood_score")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def pyfunc_input_example(cache_size: int = 256):
    """One synthetic row (a smooth gradient image, typical adult vitals): no patient data."""
    import pandas as pd

    from models.transforms import VITAL_FIELDS

    yy, xx = np.mgrid[0:cache_size, 0:cache_size] / max(cache_size - 1, 1)
    img = (0.3 + 0.4 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) * 4))[None].astype(np.float16)
    vit = dict(zip(VITAL_FIELDS, [37.0, 97.0, 80.0, 16.0, 120.0, 50.0]))
    return pd.DataFrame([{"image": encode_image(img), **vit, "sex": "F"}])
