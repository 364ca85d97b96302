"""Batch loaders that are not torch DataLoaders (the device-resident path of ``models.train``)."""
from __future__ import annotations

import math

import numpy as np


class DeviceResidentLoader:
    """A cached split held as tensors on the training device; batches are gathered on the device.

    ``images`` (N, 1, S, S) float32 in [0, 1], ``vitals`` (N, F) float32, ``labels`` (N,) int64. Iterating
    yields ``{"image", "vitals", "label"}`` batches like the DataLoader it replaces (same ``batch_size``,
    ``shuffle``, ``drop_last`` semantics); ``generator`` (CPU) draws each epoch's order, so an epoch's
    order is a function of its seed. Why: on a GPU a DenseNet step is bound by how fast the CPU launches
    kernels, and a loader thread collating and pinning batches competes with it for the interpreter.
    """

    MAX_FRACTION_OF_FREE_MEMORY = 0.25

    def __init__(self, ds, *, batch_size: int, shuffle: bool, drop_last: bool, seed: int, device: str):
        import torch

        rows = [ds[i] for i in range(len(ds))]  # cached: no transform runs again
        self.images = torch.stack([torch.as_tensor(r["image"]).float() for r in rows]).to(device)
        self.vitals = torch.stack([torch.as_tensor(r["vitals"]).float() for r in rows]).to(device)
        self.labels = torch.as_tensor([int(r["label"]) for r in rows], dtype=torch.long).to(device)
        self.batch_size, self.shuffle, self.drop_last, self.device = batch_size, shuffle, drop_last, device
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)

    @staticmethod
    def fits(ds, device: str) -> bool:
        """Whether the split's images fit in the budget (always on the CPU; a quarter of free GPU memory)."""
        import torch

        if not device.startswith("cuda"):
            return True
        first = ds[0]["image"]
        need = len(ds) * int(np.prod(tuple(first.shape))) * 4
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return need <= DeviceResidentLoader.MAX_FRACTION_OF_FREE_MEMORY * free

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        import torch

        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(self.device)
        stop = n - n % self.batch_size if self.drop_last else n
        for start in range(0, stop, self.batch_size):
            idx = order[start:start + self.batch_size]
            yield {"image": self.images.index_select(0, idx), "vitals": self.vitals.index_select(0, idx),
                   "label": self.labels.index_select(0, idx)}
