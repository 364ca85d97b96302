"""One rank of the DDP unit test (tests/test_distributed.py), spawned by torch.multiprocessing.

Runs the helpers ``models.train`` uses (``models.distributed.setup``/``wrap``/``shard_loader``/
``assert_same_weights``) on a tiny MLP and a 24-row dataset, for two optimiser steps, and writes what the
test checks to ``out/rank-<r>.pt``.
"""
from __future__ import annotations

import os
from pathlib import Path

N_ROWS, BATCH, STEPS, SEED = 24, 4, 2, 7


class Rows:
    """A map-style dataset of dicts; ``idx`` lets the test see which rows a rank trained on."""

    def __init__(self):
        import torch

        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N_ROWS, 6, generator=g)
        self.y = torch.randint(0, 3, (N_ROWS,), generator=g)

    def __len__(self):
        return N_ROWS

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i], "idx": i}


def make_net():
    import torch

    torch.manual_seed(SEED)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def run(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch
    import torch.nn.functional as F

    from models.distributed import DistributedError, setup

    torch.set_num_threads(1)
    ctx = setup("cpu")
    try:
        net = make_net()
        init = {k: v.clone() for k, v in net.state_dict().items()}
        ddp = ctx.wrap(net)
        g = torch.Generator().manual_seed(SEED)
        loader = torch.utils.data.DataLoader(Rows(), batch_size=BATCH, shuffle=True, drop_last=True, generator=g)
        loader = ctx.shard_loader(loader, SEED)
        loader.set_epoch(0)
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        seen, digests, batches = [], [], []
        for step, batch in enumerate(loader):
            if step == STEPS:
                break
            loss = F.cross_entropy(ddp(batch["x"]), batch["y"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += [int(i) for i in batch["idx"]]
            batches.append([int(i) for i in batch["idx"]])
            digests.append(ctx.assert_same_weights(net, when=f"after step {step + 1}"))
        epoch0 = loader.indices()
        loader.set_epoch(1)
        epoch1 = loader.indices()
        weights = {k: v.clone() for k, v in net.state_dict().items()}
        # the check can fail: rank 1 alone perturbs its weights
        if rank == 1:
            with torch.no_grad():
                next(net.parameters()).add_(1e-3)
        try:
            ctx.assert_same_weights(net, when="after the perturbation")
            caught = ""
        except DistributedError as exc:
            caught = str(exc)
        torch.save({"rank": rank, "backend": ctx.backend, "seen": seen, "batches": batches, "digests": digests,
                    "epoch0": epoch0, "epoch1": epoch1, "n_batches": len(loader), "init": init,
                    "weights": weights, "caught": caught},
                   Path(out) / f"rank-{rank}.pt")
    finally:
        ctx.close()
