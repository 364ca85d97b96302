"""Training throughput: the real end-to-end loop vs the model-step ceiling, in the same run.

    python benchmarks/train_throughput.py [--device auto|cpu|cuda] [--image-size 224] [--encoder densenet121]
        [--batch-size 32] [--steps 30] [--warmup 5] [--rounds 3] [--dataset NAME] [--n-images 512] [--workers N]

- end-to-end: ``models.train``'s own pieces — cached float16 arrays on disk → MONAI CacheDataset
  (load + resize cached) → on the CPU: per-sample augmentation (``train_transforms``) → ThreadDataLoader;
  on a GPU: the cached split resident on the device (``DeviceResidentLoader``) → batched on-device
  augmentation (``device_augment``) → ``train_step`` on FusionNet (image + vitals), bf16 autocast +
  channels_last on a GPU.
- ceiling: the same model and ``train_step`` on synthetic tensors already on the device.
Prints one JSON object with images/s for both and their ratio. Without ``--dataset`` it writes
``--n-images`` synthetic arrays in the dataset layout to a temporary folder first.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _synthetic_items(n: int, root: Path, n_vit: int) -> list[dict]:
    rng = np.random.default_rng(0)
    (root / "arrays").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:256, 0:256] / 255.0
    items = []
    for i in range(n):
        img = 0.5 + 0.2 * np.sin(xx * rng.uniform(2, 8) + yy * rng.uniform(2, 8)) + 0.05 * rng.standard_normal((256, 256))
        p = root / "arrays" / f"{i}.npy"
        np.save(p, np.clip(img, 0, 1)[None].astype(np.float16))
        items.append({"image": str(p), "vitals": rng.standard_normal(n_vit).astype(np.float32),
                      "label": int(rng.integers(0, 3))})
    return items


def _dataset_items(name: str, n_vit: int) -> list[dict]:
    from models.datasets import load_dataset
    from models.train import labelled, make_items
    from models.transforms import VitalsEncoder

    ds = load_dataset(name)
    frame = labelled(ds.manifest)
    return make_items(frame, ds.root, VitalsEncoder.fit(frame[frame["split"] == "train"]))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--encoder", default="densenet121")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--dataset", default=None, help="an imported dataset (default: synthetic arrays)")
    ap.add_argument("--n-images", type=int, default=512)
    ap.add_argument("--workers", type=int, default=None, help="loader worker processes (default: GPU 8, CPU 0)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--augment", default="auto", choices=["auto", "cpu", "device"],
                    help="cpu: MONAI per-sample transforms in the loader; device: batched on the device "
                         "(auto: device on a GPU, cpu otherwise) — as models.train does")
    ap.add_argument("--rounds", type=int, default=3, help="alternating ceiling/end-to-end rounds (median)")
    args = ap.parse_args(argv)

    import torch

    from models.network import FusionNet
    from models.train import build_loader, resolve_device, to_device, train_step
    from models.transforms import N_VITALS_FEATURES, device_augment, eval_transforms, train_transforms

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # CPU: denormal floats are a slow path (no effect on GPU)
    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    use_amp = cuda and torch.cuda.is_bf16_supported()
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    mods = ("image", "vitals")
    augment = ("device" if cuda else "cpu") if args.augment == "auto" else args.augment
    workers = args.workers if args.workers is not None else (0 if augment == "device" else None)

    def make_net():
        torch.manual_seed(0)
        net = FusionNet(encoder=args.encoder, image_size=args.image_size, n_vitals_features=N_VITALS_FEATURES,
                        modalities=mods).to(device)
        if cuda:
            net = net.to(memory_format=torch.channels_last)
        return net.train(), torch.optim.AdamW(net.parameters(), lr=1e-4)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    weights = torch.ones(3, device=device)
    total = args.warmup + args.steps

    B, S = args.batch_size, args.image_size

    def ceiling_round() -> float:
        net, opt = make_net()
        batches = []  # a few distinct batches, so the model cannot memorise one (→ denormal gradients)
        for _ in range(4):
            img = torch.rand(B, 1, S, S, device=device)
            if cuda:
                img = img.contiguous(memory_format=torch.channels_last)
            batches.append((img, torch.randn(B, N_VITALS_FEATURES, device=device),
                            torch.randint(0, 3, (B,), device=device)))
        for i in range(total):
            if i == args.warmup:
                sync()
                t0 = time.perf_counter()
            train_step(net, opt, *batches[i % len(batches)], weights, use_amp)
        sync()
        return args.steps * B / (time.perf_counter() - t0)

    def e2e_round(loader) -> float:
        net, opt = make_net()
        gen = torch.Generator().manual_seed(0)
        step, t0, seen = 0, None, 0
        while step < total:
            for batch in loader:
                if step == args.warmup:
                    sync()
                    t0 = time.perf_counter()
                    seen = 0
                im, vi, yy = to_device(batch, device, mods)
                if augment == "device":
                    im = device_augment(im, gen)
                train_step(net, opt, im, vi, yy, weights, use_amp)
                seen += len(yy)
                step += 1
                if step >= total:
                    break
        sync()
        return seen / (time.perf_counter() - t0)

    ceilings, e2es = [], []
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        t_prep = time.perf_counter()
        items = (_dataset_items(args.dataset, N_VITALS_FEATURES) if args.dataset
                 else _synthetic_items(args.n_images, Path(tmp), N_VITALS_FEATURES))
        tf = train_transforms(S) if augment == "cpu" else eval_transforms(S)
        _, loader = build_loader(items, tf, batch_size=B, shuffle=True, device=device, seed=0,
                                 drop_last=True, num_workers=workers, resident=augment == "device")
        cache_s = time.perf_counter() - t_prep
        for _ in range(args.rounds):  # alternate, so background load hits both alike
            ceilings.append(ceiling_round())
            e2es.append(e2e_round(loader))
    ceiling, e2e = float(np.median(ceilings)), float(np.median(e2es))

    info = {"date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device,
            "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "encoder": args.encoder,
            "image_size": S, "batch_size": B, "steps": args.steps, "bf16_autocast": use_amp, "channels_last": cuda,
            "augmentation": augment, "loader": type(loader).__name__,
            "loader_workers": workers if workers is not None else (min(8, os.cpu_count() or 2) if cuda else 0),
            "n_items": len(items), "cache_seconds": round(cache_s, 2),
            "ceiling_images_per_s": round(ceiling, 2), "end_to_end_images_per_s": round(e2e, 2),
            "ratio": round(e2e / ceiling, 3), "rounds": args.rounds,
            "ceiling_rounds": [round(x, 2) for x in ceilings], "end_to_end_rounds": [round(x, 2) for x in e2es],
            "torch": torch.__version__}
    print(json.dumps(info))
    print(f"end-to-end {e2e:.1f} img/s vs ceiling {ceiling:.1f} img/s: ratio {e2e / ceiling:.3f}", file=sys.stderr)
    return info


if __name__ == "__main__":
    main()
