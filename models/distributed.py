"""Distributed data-parallel training for ``models.train`` (torchrun semantics).

``train()`` calls ``setup(device)`` once: outside a distributed launch it returns a one-process context and
nothing changes. Inside one (``WORLD_SIZE`` > 1 in the environment) it joins the process group and training
runs as DistributedDataParallel:

- **Launch.** The environment is torchrun's: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT``. ``torchrun`` (and Kubeflow Trainer's torch-distributed runtime, which runs torchrun on each
  node) sets it; ``cxr train --nproc N`` spawns N local processes with it (``launch``).
- **Backend.** NCCL on CUDA, one GPU per local rank (``cuda:<LOCAL_RANK>``); gloo on CPU.
- **Shards.** ``DistributedSampler(seed=<run seed>, drop_last=True)`` and ``set_epoch(epoch)``: each epoch the
  training split is permuted by (seed, epoch) and cut into disjoint, equal-sized shards, one per rank (equal
  sizes keep every rank at the same number of steps: no rank waits forever in an all-reduce). Up to
  ``world_size - 1`` rows of an epoch are left out, a different few each epoch.
- **Lockstep.** Gradients are averaged by DDP; buffers (BatchNorm statistics) are broadcast from rank 0 at
  every forward; the early-stopping score is rank 0's (``agree``), so every rank stops at the same epoch.
- **Rank 0 alone** logs to MLflow, writes checkpoints, records audit events, calibrates, evaluates and
  registers; other ranks return a small summary after the last epoch.
- **Check.** After every epoch rank 0's buffers are broadcast (as DDP does before each forward), then each rank
  hashes its parameters and buffers (SHA-256); the hashes are gathered and a mismatch stops training with
  ``DistributedError`` naming the ranks.

Reproducibility: on CPU (gloo, deterministic algorithms) two runs with the same seed and world size give the
same weights and metrics. A different world size is a different run (different shards and effective batch):
the checkpoint key includes it.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from models.errors import TrainingError

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(TrainingError):
    """A distributed run cannot start (no GPUs for the ranks, bad environment) or its ranks diverged."""


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment; ``(0, 1, 0)`` outside one."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise DistributedError(f"bad torchrun environment: {exc}") from exc
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"bad torchrun environment: RANK={rank} WORLD_SIZE={world}")
    return rank, world, local


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None
    owns_group: bool = False
    digests: list[str] = field(default_factory=list)  # this rank's weight hash after each checked epoch

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ model
    def wrap(self, net):
        """``net`` wrapped in DistributedDataParallel (the module itself when not distributed). Keep using the
        unwrapped module for checkpoints, evaluation and packaging: its state-dict keys stay unprefixed."""
        if not self.enabled:
            return net
        from torch.nn.parallel import DistributedDataParallel as DDP

        if self.device.startswith("cuda"):
            return DDP(net, device_ids=[self.local_rank], output_device=self.local_rank)
        return DDP(net)

    # ------------------------------------------------------------------ data
    def shard_loader(self, loader, seed: int):
        """The training loader restricted to this rank's shard (see the module notes); unchanged when not
        distributed. Works for the DataLoader path and for ``DeviceResidentLoader``."""
        if not self.enabled:
            return loader
        from torch.utils.data import DistributedSampler

        from models.loaders import DeviceResidentLoader

        if isinstance(loader, DeviceResidentLoader):
            sampler = DistributedSampler(range(len(loader.labels)), num_replicas=self.world_size, rank=self.rank,
                                         shuffle=loader.shuffle, seed=seed, drop_last=True)
            return ShardedResidentLoader(loader, sampler)
        sampler = DistributedSampler(loader.dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                     seed=seed, drop_last=True)
        kwargs: dict[str, Any] = {"batch_size": loader.batch_size, "sampler": sampler,
                                  "drop_last": loader.drop_last and len(sampler) > loader.batch_size,
                                  "num_workers": loader.num_workers, "pin_memory": loader.pin_memory,
                                  "generator": loader.generator}
        if loader.num_workers > 0:
            kwargs.update(persistent_workers=True, prefetch_factor=loader.prefetch_factor)
        if hasattr(loader, "buffer_size"):  # MONAI ThreadDataLoader
            kwargs["buffer_size"] = loader.buffer_size
        return ShardedLoader(type(loader)(loader.dataset, **kwargs), sampler)

    # ------------------------------------------------------------------ collectives (no-ops alone)
    def mean(self, value: float) -> float:
        """The mean of ``value`` over ranks (e.g. each shard's training loss)."""
        if not self.enabled:
            return value
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def agree(self, value: float) -> float:
        """Rank 0's ``value`` on every rank (decisions such as early stopping must not diverge)."""
        if not self.enabled:
            return value
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self._collective_device())
        dist.broadcast(t, src=0)
        return float(t.item())

    def end_epoch(self, net, epoch: int) -> str:
        """Rank 0's buffers (BatchNorm running statistics) on every rank, then the weight check. DDP broadcasts
        buffers at the start of each forward, so after an epoch's last step every rank holds statistics from
        its own last batch; rank 0's are the ones checkpointed and packaged."""
        self.sync_buffers(net)
        return self.assert_same_weights(net, when=f"after epoch {epoch}")

    def sync_buffers(self, net) -> None:
        if not self.enabled:
            return
        import torch.distributed as dist

        for buf in net.buffers():
            dist.broadcast(buf.data, src=0)

    def assert_same_weights(self, net, when: str = "") -> str:
        """SHA-256 of ``net``'s parameters and buffers, checked equal on every rank; raises otherwise."""
        digest = weights_digest(net)
        self.digests.append(digest)
        if not self.enabled:
            return digest
        import torch.distributed as dist

        gathered: list[str | None] = [None] * self.world_size
        dist.all_gather_object(gathered, digest)
        if len(set(gathered)) != 1:
            groups: dict[str, list[int]] = {}
            for r, d in enumerate(gathered):
                groups.setdefault(str(d), []).append(r)
            raise DistributedError(f"model weights differ across ranks{' ' + when if when else ''}: "
                                   + "; ".join(f"ranks {v} hash {k[:12]}" for k, v in groups.items()))
        return digest

    def summary(self) -> dict[str, Any]:
        """What a rank reports at the end (rank 0 inside its result as ``distributed_rank``)."""
        return {"rank": self.rank, "world_size": self.world_size, "backend": self.backend, "device": self.device,
                "weights_sha256": list(self.digests)}

    def _collective_device(self) -> str:
        return self.device if self.backend == "nccl" else "cpu"

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False


def weights_digest(net) -> str:
    import torch

    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        t = v.detach().cpu().contiguous()
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class ShardedLoader:
    """A DataLoader over a ``DistributedSampler``: ``set_epoch`` re-permutes, ``generator`` as the loader's."""

    def __init__(self, loader, sampler) -> None:
        self.loader, self.sampler = loader, sampler

    @property
    def generator(self):
        return self.loader.generator

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def indices(self) -> list[int]:
        """This rank's rows for the current epoch (tests check shards are disjoint)."""
        return list(iter(self.sampler))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


class ShardedResidentLoader:
    """``DeviceResidentLoader`` restricted to this rank's shard (batches gathered on the device)."""

    def __init__(self, base, sampler) -> None:
        self.base, self.sampler = base, sampler
        self.generator = base.generator
        self.drop_last = base.drop_last and len(sampler) > base.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def indices(self) -> list[int]:
        return list(iter(self.sampler))

    def __len__(self) -> int:
        n, bs = len(self.sampler), self.base.batch_size
        return n // bs if self.drop_last else math.ceil(n / bs)

    def __iter__(self):
        import torch

        b = self.base
        order = torch.as_tensor(self.indices(), dtype=torch.long).to(b.device)
        n = len(order)
        stop = n - n % b.batch_size if self.drop_last else n
        for start in range(0, stop, b.batch_size):
            idx = order[start:start + b.batch_size]
            yield {"image": b.images.index_select(0, idx), "vitals": b.vitals.index_select(0, idx),
                   "label": b.labels.index_select(0, idx)}


# ------------------------------------------------------------------------------------- set-up
def setup(device: str) -> DistContext:
    """Join the process group when the environment asks for one; ``device`` is the resolved device
    (``cpu`` / ``cuda``); the context's ``device`` is this rank's (``cuda:<LOCAL_RANK>`` on GPUs)."""
    rank, world, local = env_world()
    if world == 1:
        return DistContext(device=device)
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed")
    cuda = device.startswith("cuda")
    if cuda:
        n_gpu = torch.cuda.device_count()
        if local >= n_gpu:
            raise DistributedError(f"local rank {local} needs GPU {local} but this machine has {n_gpu}; run at "
                                   f"most {n_gpu} processes per node (or --device cpu)")
        if not dist.is_nccl_available():
            raise DistributedError("CUDA training across processes needs NCCL, which this torch build lacks")
        torch.cuda.set_device(local)
        device, backend = f"cuda:{local}", "nccl"
    else:
        if not dist.is_gloo_available():
            raise DistributedError("CPU training across processes needs gloo, which this torch build lacks")
        backend = "gloo"
    owns = False
    if not dist.is_initialized():
        for k in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(k):
                raise DistributedError(f"WORLD_SIZE={world} but {k} is not set (launch with torchrun or "
                                       f"cxr train --nproc)")
        timeout = timedelta(seconds=float(os.environ.get("CXR_DIST_TIMEOUT_S", "1800")))
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world, timeout=timeout)
        owns = True
    return DistContext(rank=rank, world_size=world, local_rank=local, device=device, backend=backend,
                       owns_group=owns)
