"""Training: FusionNet on an imported dataset, evaluation on its test split, MLflow run + registration.

``train(dataset_name, *, epochs, image_size, device, seed, modalities, encoder, batch_size,
target_sensitivity, actor, resume, ...) -> {"model_version", "run_id", "dataset_version", "evaluation", ...}``

- Rows: ``label`` in covid19/other_pneumonia/normal only (``unlabeled`` rows are never trained on,
  never evaluated); splits from the manifest's ``split`` (by patient, made at ingest).
- Loss: cross-entropy weighted by inverse class frequency of the training split. AdamW, cosine LR.
- Early stopping on validation AUROC covid19-vs-rest (validation loss when AUROC is undefined),
  ``patience`` epochs; the best epoch's weights are kept.
- A checkpoint after every epoch under ``CXR_HOME/checkpoints/<dataset>/<config key>/last.pt``;
  ``resume=True`` continues from it. Each epoch's randomness is derived from (seed, epoch), so a
  resumed run reproduces an uninterrupted one.
- After training: temperature scaling and the operating threshold (target sensitivity) on the
  validation split, drift reference statistics and OOD statistics on the training split, evaluation on
  the test split (``models.evaluate``), the model logged as an MLflow pyfunc and registered as a new
  version of ``covid-cxr`` (``status=candidate``).
- GPU: bf16 autocast, channels_last, cudnn.benchmark (unless deterministic), MONAI CacheDataset +
  ThreadDataLoader. CPU: deterministic algorithms, single-process loading.
- Lifecycle events: ``training.started``, ``training.finished`` (also on failure), ``model.registered``,
  ``model.evaluated`` are handed to ``on_event(action, subject, details)``; the model library records
  nothing itself: the caller (``pipelines.lifecycle``) writes them to the audit trail.
- Distributed (``models.distributed``): under torchrun's environment (``cxr train --nproc N``, torchrun, Kubeflow
  Trainer) the model trains as DDP on disjoint shards; rank 0 alone logs, checkpoints, registers and reports
  events, other ranks return ``{"rank", "world_size", "history", "weights_sha256", ...}``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import TrainingError  # noqa: F401 - part of this module's API
from models.events import EventSink, no_event
from models.loaders import DeviceResidentLoader  # noqa: F401 - part of this module's API
from models.network import CLASSES, normalise_modalities


# ----------------------------------------------------------------------------------- data helpers
def labelled(manifest):
    return manifest[manifest["label"].isin(CLASSES)].reset_index(drop=True)


def data_fingerprint(frame) -> str:
    rows = sorted(zip(frame["image_hash"].astype(str), frame["split"].astype(str), frame["label"].astype(str)))
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def make_items(frame, root: Path, vitals_encoder) -> list[dict]:
    vit = vitals_encoder.encode_frame(frame)
    labels = frame["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    paths = [str(root / p) for p in frame["array_path"].astype(str)]
    return [{"image": p, "vitals": v, "label": int(y)} for p, v, y in zip(paths, vit, labels)]


def resolve_device(device: str = "auto") -> str:
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError("--device cuda requested but CUDA is not available on this machine")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise TrainingError(f"--device must be auto, cpu or cuda, got {device!r}")
    return device


def build_loader(items: list[dict], transform, *, batch_size: int, shuffle: bool, device: str, seed: int,
                 drop_last: bool = False, num_workers: int | None = None, cache: bool = True,
                 resident: bool = False):
    """MONAI CacheDataset (caches the deterministic prefix) + a loader over it.

    ``resident=True`` (the GPU path when augmentation runs on the device): the whole cached split is
    moved to ``device`` once and batches are gathered there (``DeviceResidentLoader``), so a training
    step costs the CPU no data work at all. It needs a deterministic ``transform`` (everything cached)
    and falls back to ThreadDataLoader when the split would take more than a quarter of free GPU memory.
    Otherwise ThreadDataLoader (GPU: worker processes) over the cache.
    """
    import torch
    from monai.data import CacheDataset, Dataset, ThreadDataLoader

    cuda = device.startswith("cuda")
    if num_workers is None:
        num_workers = min(8, (os.cpu_count() or 2)) if cuda else 0
    ds = (CacheDataset(items, transform=transform, cache_rate=1.0, num_workers=max(1, min(4, os.cpu_count() or 1)),
                       progress=False, copy_cache=False) if cache else Dataset(items, transform=transform))
    if resident and cache and len(ds) and DeviceResidentLoader.fits(ds, device):
        return ds, DeviceResidentLoader(ds, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed,
                                        device=device)
    g = torch.Generator()
    g.manual_seed(seed)
    kwargs: dict[str, Any] = {"batch_size": batch_size, "shuffle": shuffle, "drop_last": drop_last,
                              "num_workers": num_workers, "generator": g, "pin_memory": cuda}
    if num_workers > 0:
        kwargs["persistent_workers"] = True
        kwargs["prefetch_factor"] = 4
    return ds, ThreadDataLoader(ds, buffer_size=2 if cuda else 1, **kwargs)




def to_device(batch: dict, device: str, modalities: Sequence[str]):
    import torch

    cuda = device.startswith("cuda")
    img = None
    if "image" in modalities:
        img = batch["image"].to(device, non_blocking=cuda)
        if cuda:
            img = img.contiguous(memory_format=torch.channels_last)
    vit = batch["vitals"].to(device, non_blocking=cuda)
    y = batch["label"].to(device, non_blocking=cuda)
    return img, vit, y


def train_step(net, opt, img, vit, y, class_weights, use_amp: bool) -> float:
    import torch
    import torch.nn.functional as F

    ctx = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use_amp else nullcontext()
    with ctx:
        logits = net(img, vit)
    loss = F.cross_entropy(logits.float(), y, weight=class_weights)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def predict_loader(net, loader, device: str, modalities, use_amp: bool) -> tuple[np.ndarray, np.ndarray]:
    import torch

    net.eval()
    logits, labels = [], []
    ctx = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use_amp else nullcontext()
    with torch.inference_mode(), ctx:
        for batch in loader:
            img, vit, y = to_device(batch, device, modalities)
            logits.append(net(img, vit).float().cpu().numpy())
            labels.append(y.cpu().numpy())
    if not logits:
        return np.zeros((0, len(CLASSES))), np.zeros(0, dtype=int)
    return np.concatenate(logits).astype(np.float64), np.concatenate(labels).astype(int)


def covid_auroc(labels: np.ndarray, logits: np.ndarray) -> float | None:
    from models.evaluate import _auroc, softmax

    if len(labels) == 0:
        return None
    return _auroc(labels == 0, softmax(logits)[:, 0])


# ----------------------------------------------------------------------------- reference statistics
def reference_statistics(frame, images: list[np.ndarray], ood_scores: np.ndarray) -> dict:
    """Drift reference on the training split (docs/INTERFACES.md): vitals + pixel-intensity histograms."""
    from models.transforms import VITAL_FIELDS

    try:
        from models.preprocessing import VITAL_RANGES
    except ImportError:
        VITAL_RANGES = {}
    ref: dict[str, Any] = {"vitals": {}, "split": "train", "n_images": len(frame)}
    for f in VITAL_FIELDS:
        vals = frame[f].astype(float).to_numpy() if f in frame else np.array([])
        present = vals[np.isfinite(vals)]
        rng = VITAL_RANGES.get(f) if isinstance(VITAL_RANGES, dict) else None
        try:
            lo, hi = float(rng[0]), float(rng[1])
        except (TypeError, IndexError, KeyError, ValueError):
            lo = float(present.min()) - 1 if len(present) else 0.0
            hi = float(present.max()) + 1 if len(present) else 1.0
        inner = np.unique(np.quantile(present, np.linspace(0.1, 0.9, 9))) if len(present) >= 10 else np.array([])
        edges = [lo, *[float(x) for x in inner if lo < x < hi], hi]
        counts = np.histogram(np.clip(present, lo, hi), bins=edges)[0] if len(present) else np.zeros(len(edges) - 1)
        total = counts.sum()
        fractions = (counts / total).tolist() if total else [1.0 / (len(edges) - 1)] * (len(edges) - 1)
        ref["vitals"][f] = {"edges": edges, "fractions": fractions,
                            "missing_fraction": float(1 - len(present) / max(len(vals), 1)),
                            "n": int(len(present))}
    edges = np.linspace(0.0, 1.0, 21)
    counts = np.zeros(20)
    for im in images:
        counts += np.histogram(np.clip(np.asarray(im, dtype=np.float32), 0, 1), bins=edges)[0]
    ref["image_intensity"] = {"edges": edges.tolist(),
                              "fractions": (counts / counts.sum()).tolist() if counts.sum() else [0.05] * 20,
                              "unit": "pixel", "n_images": len(images)}
    finite = ood_scores[np.isfinite(ood_scores)] if len(ood_scores) else ood_scores
    ref["ood"] = {"threshold": float(np.percentile(finite, 99)) if len(finite) else None,
                  "score": "mean squared z-score of the fused embedding", "percentile": 99}
    return ref


def system_info(device: str) -> dict:
    import mlflow
    import monai
    import torch

    info = {"python": sys.version.split()[0], "platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "monai": monai.__version__,
            "mlflow": mlflow.__version__, "numpy": np.__version__, "device": device,
            "torch_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def _seed_all(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _checkpoint_dir(dataset_name: str, key: dict) -> Path:
    from core.config import get_settings

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return get_settings().state_dir / "checkpoints" / dataset_name / digest


# ---------------------------------------------------------------------------------------- train
def train(dataset_name: str, *, epochs: int = 10, image_size: int = 224, device: str = "auto", seed: int = 42,
          modalities: str | Sequence[str] = ("image", "vitals"), encoder: str = "densenet121",
          batch_size: int = 16, target_sensitivity: float = 0.90, actor: str | None = None,
          resume: bool = False, lr: float | None = None, weight_decay: float = 1e-4, patience: int = 5,
          n_bootstrap: int = 1000, deterministic: bool | None = None, num_workers: int | None = None,
          external: Sequence[str] = (), show_progress: bool = True, augment: str = "auto",
          on_epoch_end: Callable[[int, dict], None] | None = None,
          on_event: EventSink | None = None, shortcut_battery: bool = True) -> dict:
    """Train, evaluate, log and register; returns ``{"model_version", "run_id", "dataset_version",
    "dataset", "evaluation", "history", "checkpoint"}``. Raises ``TrainingError`` for bad input.

    ``shortcut_battery`` (default on): after the model, the shortcut battery (``models.shortcut``:
    image-only / vitals-only / missingness-only ablations on the same split and seeds, masked-lung tests,
    site probe) and the deployment-prevalence section (``models.prevalence``) go into evaluation.json."""
    import mlflow
    import torch
    from rich.console import Console

    from core.config import get_settings
    from core.identity import acting_user
    from core.lineage import git_commit
    from models import distributed, registry
    from models.datasets import DatasetNotFound, load_dataset
    from models.network import FusionNet
    from models.transforms import VitalsEncoder, eval_transforms, train_transforms

    console = Console(stderr=True, quiet=not show_progress)
    settings = get_settings()
    actor = acting_user(actor)
    emit = on_event or no_event
    modalities = normalise_modalities(modalities)
    if epochs < 1 or image_size < 16 or batch_size < 1:
        raise TrainingError("epochs ≥ 1, image size ≥ 16 and batch size ≥ 1 are required")
    if not 0 < target_sensitivity < 1:
        raise TrainingError("target sensitivity must be between 0 and 1")
    device = resolve_device(device)
    cuda = device.startswith("cuda")
    deterministic = (not cuda) if deterministic is None else deterministic
    lr = lr if lr is not None else (1e-3 if encoder == "small" else 3e-4)

    try:
        ds = load_dataset(dataset_name)
    except DatasetNotFound as exc:
        raise TrainingError(str(exc)) from exc
    dataset_version = str(ds.version.get("dataset_version") or "untracked")
    man = labelled(ds.manifest)
    n_unlabelled = int(len(ds.manifest) - len(man))
    splits = {s: man[man["split"] == s].reset_index(drop=True) for s in ("train", "val", "test")}
    if len(splits["train"]) == 0:
        raise TrainingError(f"dataset {dataset_name!r} has no labelled training rows")
    if splits["train"]["label"].nunique() < 2:
        raise TrainingError(f"dataset {dataset_name!r}: the training split holds a single class "
                            f"({splits['train']['label'].iloc[0]}); at least two are needed")
    warnings = []
    for s in ("val", "test"):
        if len(splits[s]) == 0:
            raise TrainingError(f"dataset {dataset_name!r} has no labelled {s} rows")
        if not (splits[s]["label"] == "covid19").any():
            warnings.append(f"no covid19 case in the {s} split")
    for w in warnings:
        console.print(f"[yellow]warning:[/] {w}")

    dctx = distributed.setup(device)  # one process unless launched distributed (torchrun environment)
    device = dctx.device
    if not dctx.is_main:
        console.quiet = True
    prev_threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(max(1, min(prev_threads, int(os.environ.get("CXR_TORCH_THREADS", "8")))))
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_bench = torch.backends.cudnn.benchmark
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = cuda
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    use_amp = cuda and torch.cuda.is_bf16_supported()

    _seed_all(seed)
    vitals_encoder = VitalsEncoder.fit(splits["train"])
    items = {s: make_items(splits[s], ds.root, vitals_encoder) for s in splits}
    fingerprint = data_fingerprint(man)
    key = {"dataset": dataset_name, "dataset_version": dataset_version, "fingerprint": fingerprint,
           "encoder": encoder, "image_size": image_size, "modalities": list(modalities), "seed": seed,
           "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "device_kind": "cuda" if cuda else "cpu",
           **({"world_size": dctx.world_size} if dctx.enabled else {})}
    ckpt_dir = _checkpoint_dir(dataset_name, key)
    ckpt_path = ckpt_dir / "last.pt"

    counts = splits["train"]["label"].value_counts()
    n_tr = len(splits["train"])
    cw = [n_tr / (len(CLASSES) * counts[c]) if counts.get(c, 0) else 0.0 for c in CLASSES]
    class_weights = torch.tensor(cw, dtype=torch.float32, device=device)

    net = FusionNet(encoder=encoder, image_size=image_size, n_vitals_features=vitals_encoder.n_features,
                    modalities=modalities).to(device)
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    train_net = dctx.wrap(net)  # DDP for the training steps; ``net`` itself for everything else
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1), eta_min=lr * 0.05)

    state = {"epoch": 0, "best_score": -math.inf, "best_epoch": 0, "best_state": None, "bad_epochs": 0,
             "history": [], "run_id": None}
    resumed_from = None
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        state = ck["state"]
        resumed_from = state["epoch"]
        console.print(f"resuming from {ckpt_path} after epoch {state['epoch']}")
    elif resume:
        console.print(f"[yellow]no checkpoint for this configuration ({ckpt_path}); starting from scratch[/]")

    # augmentation: "cpu" = MONAI dictionary transforms per sample (deterministic CPU path);
    # "device" = the same augmentation batched on the device (GPU default: the loader only collates
    # cached tensors, so the GPU is not starved by per-image CPU work)
    augment = ("device" if cuda else "cpu") if augment == "auto" else augment
    if augment not in ("cpu", "device"):
        raise TrainingError("augment must be auto, cpu or device")
    train_tf = train_transforms(image_size) if augment == "cpu" else eval_transforms(image_size)
    eval_tf = eval_transforms(image_size)
    drop_last = len(items["train"]) > batch_size
    t_cache = time.perf_counter()
    _, train_loader = build_loader(items["train"], train_tf, batch_size=batch_size, shuffle=True, device=device,
                                   seed=seed, drop_last=drop_last,
                                   num_workers=num_workers if num_workers is not None else
                                   (0 if augment == "device" else None), resident=augment == "device")
    _, val_loader = build_loader(items["val"], eval_tf, batch_size=max(batch_size, 32), shuffle=False,
                                 device=device, seed=seed, num_workers=0, resident=augment == "device")
    cache_seconds = time.perf_counter() - t_cache
    train_loader = dctx.shard_loader(train_loader, seed)

    if not dctx.is_main:  # ranks > 0 train in lockstep; MLflow, audit, checkpoints and packaging are rank 0's
        try:
            return _fit_and_package(**{**locals(), "run_id": None, "commit": None, "params": {}})
        finally:
            torch.use_deterministic_algorithms(prev_det)
            torch.backends.cudnn.benchmark = prev_bench
            torch.set_num_threads(prev_threads)
            dctx.close()
    registry.configure_mlflow()
    run = None
    if resumed_from is not None and state.get("run_id"):
        try:
            old = mlflow.get_run(state["run_id"])
            if old.info.status != "FINISHED":
                run = mlflow.start_run(run_id=state["run_id"])
        except Exception:  # noqa: BLE001 - the store was reset: start a new run
            run = None
    if run is None:
        run = mlflow.start_run(run_name=f"train-{dataset_name}-{encoder}-{image_size}")
    run_id = run.info.run_id
    prev_run = state.get("run_id")
    state["run_id"] = run_id
    commit = git_commit()  # the code's commit (the dataset's is in its version)
    sysinfo = system_info(device)
    params = {"dataset": dataset_name, "epochs": epochs, "image_size": image_size, "device": device, "seed": seed,
              "encoder": encoder, "modalities": ",".join(modalities), "batch_size": batch_size, "lr": lr,
              "weight_decay": weight_decay, "patience": patience, "target_sensitivity": target_sensitivity,
              "deterministic": deterministic, "bf16_autocast": use_amp, "augmentation": augment, "channels_last": cuda,
              "n_train": len(items["train"]), "n_val": len(items["val"]), "n_test": len(items["test"]),
              "n_unlabelled_excluded": n_unlabelled, "class_weights": json.dumps([round(x, 4) for x in cw]),
              "n_vitals_features": vitals_encoder.n_features, "n_bootstrap": n_bootstrap,
              "world_size": dctx.world_size, "distributed_backend": dctx.backend or "none"}
    try:
        if resumed_from is None or prev_run != run_id:
            mlflow.log_params({k: str(v) for k, v in params.items()})
        mlflow.set_tags({"dataset_version": dataset_version, "dataset_name": dataset_name, "git_commit": commit,
                         "trained_by": actor, "data_fingerprint": fingerprint, "device": device,
                         "mlflow.note.content": f"FusionNet ({encoder}, {','.join(modalities)}) on {dataset_name}",
                         **({"resumed_from_run": prev_run, "resumed_after_epoch": str(resumed_from)}
                            if resumed_from is not None else {}),
                         **{f"system.{k}": str(v) for k, v in sysinfo.items()}})
        mlflow.log_dict(sysinfo, "system/system_info.json")
        emit("training.started", subject=f"dataset/{dataset_name}",
                     details={"dataset": dataset_name, "dataset_version": dataset_version, "run_id": run_id,
                              "encoder": encoder, "image_size": image_size, "epochs": epochs, "seed": seed,
                              "modalities": list(modalities), "device": device, "resumed_after_epoch": resumed_from,
                              "n_train": len(items["train"]), "n_val": len(items["val"]), "n_test": len(items["test"])})
    except BaseException:
        mlflow.end_run(status="FAILED")
        torch.use_deterministic_algorithms(prev_det)
        torch.backends.cudnn.benchmark = prev_bench
        torch.set_num_threads(prev_threads)
        raise
    try:
        result = _fit_and_package(**locals())
        mlflow.end_run(status="FINISHED")
        return result
    except BaseException as exc:
        mlflow.end_run(status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        emit("training.finished", subject=f"dataset/{dataset_name}",
                     details={"run_id": run_id, "status": "failed", "error": type(exc).__name__,
                              "epochs_completed": state["epoch"], "checkpoint": str(ckpt_path)})
        raise
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.backends.cudnn.benchmark = prev_bench
        torch.set_num_threads(prev_threads)
        dctx.close()


def _fit_and_package(*, net, opt, sched, state, epochs, patience, train_loader, val_loader, train_tf, seed, device,
                     modalities, class_weights, use_amp, ckpt_dir, ckpt_path, console, show_progress,
                     on_epoch_end, splits, ds, vitals_encoder, encoder, image_size, dataset_name, dataset_version,
                     target_sensitivity, n_bootstrap, actor, emit, run_id, commit, fingerprint, external,
                     cache_seconds, warnings, params, augment, dctx=None, train_net=None, **_unused) -> dict:
    import mlflow
    import torch
    import torch.nn.functional as F
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from core.config import get_settings
    from models import registry
    from models.evaluate import _json_default, choose_threshold, evaluate_predictions, fit_temperature, write_plots
    from models.serving import ClinicalModel, CovidCxrPyfunc, pyfunc_input_example, pyfunc_signature, save_package
    from models.transforms import device_augment

    settings = get_settings()
    if dctx is None:
        from models.distributed import DistContext

        dctx = DistContext(device=device)
    train_net = train_net if train_net is not None else net
    if dctx.is_main:
        mlflow.log_metric("cache_seconds", cache_seconds)
    start_epoch = state["epoch"] + 1
    progress = Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                        disable=not show_progress or not console.is_terminal)
    t_fit = time.perf_counter()
    with progress:
        for epoch in range(start_epoch, epochs + 1):
            if state["bad_epochs"] >= patience:
                break
            # randomness of an epoch = f(seed, epoch): a resumed run repeats an uninterrupted one
            ep_seed = seed * 1009 + epoch
            _seed_all(ep_seed)
            if hasattr(train_tf, "set_random_state"):
                train_tf.set_random_state(seed=ep_seed % (2**32))
            train_loader.generator.manual_seed(ep_seed)
            if hasattr(train_loader, "set_epoch"):  # distributed: this epoch's shard
                train_loader.set_epoch(epoch)
            aug_gen = torch.Generator().manual_seed(ep_seed)
            net.train()
            task = progress.add_task("train", total=len(train_loader), epoch=f"{epoch}/{epochs}", info="")
            t0 = time.perf_counter()
            losses, n_seen = [], 0
            for batch in train_loader:
                img, vit, y = to_device(batch, device, modalities)
                if augment == "device" and img is not None:
                    img = device_augment(img, aug_gen)
                losses.append(train_step(train_net, opt, img, vit, y, class_weights, use_amp))
                n_seen += len(y)
                progress.update(task, advance=1, info=f"loss {np.mean(losses):.4f}")
            sched.step()
            train_seconds = time.perf_counter() - t0
            if dctx.enabled:
                dctx.end_epoch(net, epoch)  # rank 0's BatchNorm statistics everywhere; weights checked equal
            val_logits, val_y = predict_loader(net, val_loader, device, modalities, use_amp)
            val_loss = float(F.cross_entropy(torch.tensor(val_logits), torch.tensor(val_y)).item())
            val_auc = covid_auroc(val_y, val_logits)
            val_acc = float((val_logits.argmax(1) == val_y).mean())
            score = dctx.agree(val_auc if val_auc is not None else -val_loss)  # rank 0's, on every rank
            improved = score > state["best_score"] + 1e-4
            if improved:
                state.update(best_score=score, best_epoch=epoch, bad_epochs=0,
                             best_state={k: v.detach().cpu().clone() for k, v in net.state_dict().items()})
            else:
                state["bad_epochs"] += 1
            metrics = {"train_loss": dctx.mean(float(np.mean(losses)) if losses else float("nan")), "val_loss": val_loss,
                       "val_accuracy": val_acc, "lr": float(opt.param_groups[0]["lr"]),
                       "epoch_seconds": train_seconds,
                       "train_images_per_second": n_seen * dctx.world_size / train_seconds if train_seconds else 0.0}
            if val_auc is not None:
                metrics["val_auroc_covid19"] = val_auc
            state["epoch"] = epoch
            state["history"].append({"epoch": epoch, **metrics, "val_auroc_covid19": val_auc})
            if not dctx.is_main:
                continue
            mlflow.log_metrics(metrics, step=epoch)
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "state": state}, tmp)
            os.replace(tmp, ckpt_path)
            progress.update(task, info=(f"loss {metrics['train_loss']:.4f}  val loss {val_loss:.4f}  "
                                        f"val AUROC {'n/a' if val_auc is None else f'{val_auc:.3f}'}"
                                        f"{'  *' if improved else ''}"))
            if not console.is_terminal:  # logs / CI: one line per epoch instead of a live bar
                console.print(f"epoch {epoch}/{epochs}  loss {metrics['train_loss']:.4f}  val loss {val_loss:.4f}  "
                              f"val AUROC {'n/a' if val_auc is None else f'{val_auc:.3f}'}  "
                              f"{metrics['train_images_per_second']:.1f} img/s{'  (best)' if improved else ''}")
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics)
    fit_seconds = time.perf_counter() - t_fit
    if state["best_state"] is None:
        raise TrainingError("no epoch completed")
    if not dctx.is_main:
        return {**dctx.summary(), "history": state["history"], "best_epoch": state["best_epoch"]}
    net.load_state_dict(state["best_state"])
    net.eval()

    # ---- calibration, threshold, reference statistics via the serving path
    config: dict[str, Any] = {
        "classes": list(CLASSES), "network": net.config(),
        "input": {"cache_image_size": settings.cache_image_size,
                  "image": "float32 (1, 256, 256) in [0, 1] (models.preprocessing.prepare_image)"},
        "vitals_encoder": vitals_encoder.to_dict(), "temperature": 1.0, "operating_threshold": 0.5,
        "training": {"dataset": dataset_name, "dataset_version": dataset_version, "git_commit": commit,
                     "seed": seed, "run_id": run_id, "best_epoch": state["best_epoch"],
                     "epochs_run": state["epoch"], "data_fingerprint": fingerprint},
    }
    # prevalence: the class-weighted loss trains towards the weighted (≈ balanced) prior; an offset on
    # the logits moves them back to the development prevalence (train + val labels) before the
    # temperature is fitted on validation (models/statistics.prior_logit_offset)
    config["prior_correction"] = _prior_correction(splits, splits["train"]["label"].value_counts(),
                                                   [float(w) for w in class_weights.detach().cpu().tolist()])
    cpu_net = type(net)(**net.config()).eval()
    cpu_net.load_state_dict({k: v.detach().cpu() for k, v in state["best_state"].items()})
    clinical = ClinicalModel(cpu_net, config, version="training", run_id=run_id, device="cpu")

    def split_arrays(frame, limit: int | None = None):
        frame = frame if limit is None or len(frame) <= limit else frame.sample(limit, random_state=seed)
        return frame, [ds.array(r) for _, r in frame.iterrows()], frame.to_dict("records")

    def logits_emb(images, vit):
        outs, embs = [], []
        for i in range(0, len(vit), 64):
            lo, em = clinical._forward(images[i:i + 64], vit[i:i + 64])
            outs.append(lo)
            embs.append(em)
        return np.concatenate(outs), np.concatenate(embs)

    label_idx = {c: i for i, c in enumerate(CLASSES)}
    tr_frame, tr_imgs, tr_vit = split_arrays(splits["train"], limit=2000)
    _, tr_emb = logits_emb(tr_imgs, tr_vit)
    emb_mean, emb_std = tr_emb.mean(0), tr_emb.std(0) + 1e-3
    config["ood_stats"] = {"mean": emb_mean.tolist(), "std": emb_std.tolist(), "n": int(len(tr_emb))}
    tr_ood = (((tr_emb - emb_mean) / emb_std) ** 2).mean(1)
    config["reference"] = reference_statistics(tr_frame, tr_imgs, tr_ood)
    del tr_imgs

    va_frame, va_imgs, va_vit = split_arrays(splits["val"])
    va_logits, _ = logits_emb(va_imgs, va_vit)
    va_y = va_frame["label"].map(label_idx).to_numpy(dtype=int)
    temperature = fit_temperature(va_logits, va_y)
    from models.evaluate import softmax

    sel = choose_threshold(softmax(va_logits, temperature)[:, 0], va_y == 0, target_sensitivity)
    config.update(temperature=temperature, operating_threshold=sel["threshold"], threshold_selection=sel)
    clinical = ClinicalModel(cpu_net, config, version="training", run_id=run_id, device="cpu")

    te_frame, te_imgs, te_vit = split_arrays(splits["test"])
    te_logits, _ = logits_emb(te_imgs, te_vit)
    te_y = te_frame["label"].map(label_idx).to_numpy(dtype=int)
    evaluation, curves = evaluate_predictions(
        te_y, te_logits, temperature=temperature, threshold=sel["threshold"],
        patient_ids=te_frame["patient_id"].astype(str).tolist(), meta=te_frame, n_bootstrap=n_bootstrap, seed=seed,
        threshold_selection=sel)
    evaluation["warnings"] = list(dict.fromkeys([*warnings, *evaluation["warnings"]]))
    val_eval, _ = evaluate_predictions(va_y, va_logits, temperature=temperature, threshold=sel["threshold"],
                                       patient_ids=va_frame["patient_id"].astype(str).tolist(), n_bootstrap=0)

    # ---- package + pyfunc + registration
    work = settings.state_dir / "tmp" / f"train-{run_id}"
    if work.exists():
        shutil.rmtree(work)
    pkg = save_package(work / "package", cpu_net.state_dict(), config)

    info = mlflow.pyfunc.log_model(
        name="model", python_model=CovidCxrPyfunc(), artifacts={"model_dir": str(pkg)},
        signature=pyfunc_signature(), input_example=pyfunc_input_example(settings.cache_image_size),
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"monai=={_monai_version()}",
                          f"mlflow=={mlflow.__version__}", "numpy", "pandas", "covid-cxr"],
        metadata={"dataset_version": dataset_version, "git_commit": commit})
    version = registry.register_version(
        info.model_uri,
        tags={"status": "candidate", "dataset_version": dataset_version, "dataset_name": dataset_name,
              "git_commit": commit, "trained_by": actor, "registered_by": actor, "run_id": run_id,
              "encoder": encoder, "image_size": str(image_size), "modalities": ",".join(modalities),
              "evaluation_artifact": f"runs:/{run_id}/evaluation/evaluation.json"},
        description=f"FusionNet ({encoder}, {','.join(modalities)}, {image_size}px) trained on {dataset_name} "
                    f"({dataset_version}); research use only")
    mlflow.set_tag("model_version", version)
    emit("model.registered", subject=f"model/{registry.model_name()}/{version}",
                 details={"model": registry.model_name(), "version": version, "run_id": run_id,
                          "dataset": dataset_name, "dataset_version": dataset_version, "git_commit": commit,
                          "status": "candidate"})

    # ---- external validation datasets requested at training time
    external_results: dict[str, dict] = {}
    evaluation.update({"dataset": dataset_name, "dataset_version": dataset_version, "split": "test",
                       "model_name": registry.model_name(), "model_version": version, "run_id": run_id,
                       "git_commit": commit, "trained_on": dataset_name, "is_external": False,
                       "validation": {k: val_eval[k] for k in ("covid19_vs_rest", "calibration", "n_images",
                                                               "n_patients")},
                       "training": {"epochs_run": state["epoch"], "best_epoch": state["best_epoch"],
                                    "best_val_auroc_covid19": state["best_score"]
                                    if state["best_score"] > -math.inf and state["best_score"] >= 0 else None,
                                    "encoder": encoder, "image_size": image_size, "modalities": list(modalities)},
                       "external": external_results})
    eval_dir = work / "evaluation"
    eval_dir.mkdir(parents=True, exist_ok=True)
    # ---- deployment prevalence + shortcut battery (issue 14; models/prevalence.py, models/shortcut.py)
    from models.prevalence import plot_decision_curve, prevalence_report

    p_test = softmax(te_logits, temperature)[:, 0]
    evaluation["prevalence"] = prevalence_report(te_y == 0, p_test, sel["threshold"],
                                                 te_frame["patient_id"].astype(str).tolist(),
                                                 n_bootstrap=n_bootstrap, seed=seed)
    if _unused.get("shortcut_battery", True):
        from models.shortcut import battery_at_training

        evaluation["shortcut"] = battery_at_training(
            clinical=clinical, splits=splits, ds=ds, te_frame=te_frame, te_imgs=te_imgs, p_test=p_test,
            vitals_encoder=vitals_encoder, modalities=modalities, seed=seed, fusion_seconds=fit_seconds,
            train_image_only=lambda: fit_image_only(
                train_loader=train_loader, val_loader=val_loader, train_tf=train_tf, epochs=epochs, patience=patience,
                seed=seed, device=device, lr=_unused["lr"], weight_decay=_unused["weight_decay"],
                class_weights=class_weights, use_amp=use_amp, augment=augment, encoder=encoder,
                image_size=image_size, n_vitals_features=vitals_encoder.n_features),
            n_bootstrap=n_bootstrap, out_dir=eval_dir / "shortcut_models", console=console)
        evaluation["warnings"] = list(dict.fromkeys([*evaluation["warnings"], *evaluation["shortcut"]["warnings"]]))
        mlflow.log_metrics({k: v for k, v in {
            "shortcut_battery_seconds": evaluation["shortcut"]["cost"]["battery_seconds"],
            "fusion_fit_seconds": fit_seconds,
            "masked_lungs_auroc": (evaluation["shortcut"].get("masked_lungs") or {}).get("auroc", {}).get("value"),
        }.items() if v is not None})
    plot_decision_curve(evaluation["prevalence"]["decision_curve"], eval_dir)
    write_plots(evaluation, eval_dir, curves)  # first: adds the per-site reliability numbers
    (eval_dir / "evaluation.json").write_text(json.dumps(evaluation, indent=2, default=_json_default))
    import pandas as pd

    pred = pd.DataFrame({"image_hash": te_frame["image_hash"].astype(str), "label": te_frame["label"],
                         **{f"p_{c}": softmax(te_logits, temperature)[:, i] for i, c in enumerate(CLASSES)}})
    pred.to_csv(eval_dir / "test_predictions.csv", index=False)
    (eval_dir / "history.json").write_text(json.dumps(state["history"], indent=2, default=_json_default))
    mlflow.log_artifacts(str(eval_dir), "evaluation")
    local_copy = registry._local_eval_dir(version)
    local_copy.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(eval_dir / "evaluation.json", local_copy / "evaluation.json")

    cvr = evaluation["covid19_vs_rest"]
    final = {f"test_{k}": cvr[k]["value"] for k in ("auroc", "sensitivity", "specificity", "ppv", "npv")
             if cvr[k]["value"] is not None}
    final.update({"temperature": temperature, "operating_threshold": sel["threshold"],
                  "test_ece_before": evaluation["calibration"]["ece_before"] or 0.0,
                  "test_ece_after": evaluation["calibration"]["ece_after"] or 0.0,
                  "best_epoch": state["best_epoch"]})
    mlflow.log_metrics(final)
    emit("model.evaluated", subject=f"model/{registry.model_name()}/{version}",
                 details={"model": registry.model_name(), "model_version": version, "dataset": dataset_name,
                          "dataset_version": dataset_version, "split": "test", "is_external": False,
                          "n_images": evaluation["n_images"], "n_patients": evaluation["n_patients"],
                          "auroc": cvr["auroc"]["value"], "sensitivity": cvr["sensitivity"]["value"],
                          "specificity": cvr["specificity"]["value"]})
    for name in external:
        if name == dataset_name:
            continue
        from models.validation import evaluate_model_version

        ext = evaluate_model_version(version, name, seed=seed, n_bootstrap=n_bootstrap, on_event=emit)
        external_results[name] = {k: ext.get(k) for k in ("covid19_vs_rest", "calibration", "n_images", "n_patients",
                                                          "dataset_version", "per_class_auroc", "provenance",
                                                          "is_external", "evaluation_role", "interval_method")}
    emit("training.finished", subject=f"model/{registry.model_name()}/{version}",
                 details={"run_id": run_id, "status": "finished", "model_version": version,
                          "epochs_run": state["epoch"], "best_epoch": state["best_epoch"],
                          "dataset_version": dataset_version, "test_auroc": cvr["auroc"]["value"]})
    shutil.rmtree(work, ignore_errors=True)
    summary = {k: cvr[k] for k in ("auroc", "sensitivity", "specificity", "ppv", "npv")}
    summary.update(threshold=cvr["threshold"], temperature=temperature,
                   ece_before=evaluation["calibration"]["ece_before"], ece_after=evaluation["calibration"]["ece_after"],
                   n_patients=evaluation["n_patients"], n_images=evaluation["n_images"],
                   per_class_auroc=evaluation["per_class_auroc"], external={k: v["covid19_vs_rest"]["auroc"]
                                                                            for k, v in external_results.items()})
    return {"model_version": version, "run_id": run_id, "dataset_version": dataset_version,
            "dataset": dataset_name, "model_name": registry.model_name(),
            "evaluation": summary, "evaluation_full": evaluation, "history": state["history"],
            "checkpoint": str(ckpt_path), "warnings": evaluation["warnings"],
            **({"distributed_rank": {**dctx.summary(), "history": state["history"]}} if dctx.enabled else {})}


def fit_image_only(*, train_loader, val_loader, train_tf, epochs: int, patience: int, seed: int, device: str,
                   lr: float, weight_decay: float, class_weights, use_amp: bool, augment: str, encoder: str,
                   image_size: int, n_vitals_features: int) -> tuple[Any, list[dict]]:
    """The shortcut battery's image-only ablation (models.shortcut): FusionNet(modalities=image) trained like
    the model — same loaders, seeds, schedule and early stopping — without checkpoints, MLflow or registration."""
    import torch

    from models.network import FusionNet
    from models.transforms import device_augment

    modalities = ("image",)
    _seed_all(seed)
    net = FusionNet(encoder=encoder, image_size=image_size, n_vitals_features=n_vitals_features,
                    modalities=modalities).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1), eta_min=lr * 0.05)
    best, best_state, bad, history = -math.inf, None, 0, []
    for epoch in range(1, epochs + 1):
        if bad >= patience:
            break
        ep_seed = seed * 1009 + epoch
        _seed_all(ep_seed)
        if hasattr(train_tf, "set_random_state"):
            train_tf.set_random_state(seed=ep_seed % (2**32))
        train_loader.generator.manual_seed(ep_seed)
        aug_gen = torch.Generator().manual_seed(ep_seed)
        net.train()
        losses = []
        for batch in train_loader:
            img, vit, y = to_device(batch, device, modalities)
            if augment == "device":
                img = device_augment(img, aug_gen)
            losses.append(train_step(net, opt, img, None, y, class_weights, use_amp))
        sched.step()
        val_logits, val_y = predict_loader(net, val_loader, device, modalities, use_amp)
        auc = covid_auroc(val_y, val_logits)
        score = auc if auc is not None else -float(torch.nn.functional.cross_entropy(
            torch.tensor(val_logits), torch.tensor(val_y)))
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else None, "val_auroc": auc})
        if score > best + 1e-4:
            best, bad = score, 0
            best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        else:
            bad += 1
    cpu = FusionNet(**net.config()).eval()
    cpu.load_state_dict(best_state if best_state is not None else {k: v.cpu() for k, v in net.state_dict().items()})
    return cpu, history


def _monai_version() -> str:
    import monai

    return monai.__version__


def _prior_correction(splits: dict, train_counts, class_weights: list[float]) -> dict[str, Any]:
    """What ``ClinicalModel`` adds to the logits (``logit_offset``) and the development prevalence a
    site's deployment prevalence is corrected from (models/statistics.prior_shift)."""
    import pandas as pd

    from models.statistics import prior_logit_offset

    dev = pd.concat([splits["train"], splits["val"]])
    dev = dev[dev["label"].isin(CLASSES)]
    n_dev = max(1, len(dev))
    dev_prior = [float((dev["label"] == c).sum()) / n_dev for c in CLASSES]
    effective = [float(train_counts.get(c, 0)) * float(w) for c, w in zip(CLASSES, class_weights)]
    tot = sum(effective) or 1.0
    return {"logit_offset": prior_logit_offset(dev_prior, effective),
            "development_prevalence": dict(zip(CLASSES, dev_prior)),
            "development_prevalence_covid19": dev_prior[0],
            "training_effective_prior": {c: e / tot for c, e in zip(CLASSES, effective)},
            "method": "logit offset log(dev prior) - log(class-weighted training prior), then temperature "
                      "scaling fitted on validation; P(covid19) is calibrated at the development prevalence. A "
                      "site's prevalence is applied with the Bayes odds correction (models.statistics.prior_shift)."}
