"""``cxr train --nproc N`` on one machine: N local processes with torchrun's environment (DDP).

Each spawned rank runs ``models.train.train`` (which sets the process group up through
``models.distributed``); rank 0's result is returned, with every rank's summary.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from models.errors import TrainingError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def _worker(local_rank: int, nproc: int, port: int, train_kwargs: dict, out_dir: str) -> None:
    """One spawned rank: torchrun's environment, then ``models.train.train``; rank 0 writes the result."""
    import sys

    os.environ.update({"RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(nproc),
                       "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    # the ranks share the machine's cores
    os.environ.setdefault("CXR_TORCH_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.dup2(2, 1)  # stdout belongs to the parent's result (cxr train --json): ranks write to stderr
    sys.stdout = sys.stderr
    out = Path(out_dir)
    try:
        from models.train import train

        result = train(**train_kwargs)
        with open(out / f"result-{local_rank}.pkl", "wb") as fh:
            pickle.dump(result, fh)
    except BaseException as exc:
        (out / f"error-{local_rank}.json").write_text(json.dumps({"type": type(exc).__name__, "message": str(exc)}))
        raise

def launch(nproc: int, dataset_name: str, **train_kwargs: Any) -> dict[str, Any]:
    """``train(dataset_name, **train_kwargs)`` on ``nproc`` local processes (DDP); returns rank 0's result with
    ``distributed`` = {world_size, backend, rank_summaries} added. Raises ``models.train.TrainingError`` with
    the failing rank's message."""
    import torch
    import torch.multiprocessing as mp

    from models.train import resolve_device

    if nproc < 1:
        raise TrainingError("--nproc must be at least 1")
    device = resolve_device(train_kwargs.get("device", "auto"))
    if device.startswith("cuda") and nproc > torch.cuda.device_count():
        raise TrainingError(f"--nproc {nproc} on CUDA needs {nproc} GPUs; this machine has "
                            f"{torch.cuda.device_count()} (use --device cpu for gloo on CPU)")
    train_kwargs = dict(train_kwargs, dataset_name=dataset_name, device=device)
    if nproc == 1:
        from models.train import train

        return train(**train_kwargs)
    out = Path(tempfile.mkdtemp(prefix="cxr-ddp-"))
    try:
        try:
            mp.start_processes(_worker, args=(nproc, free_port(), train_kwargs, str(out)),
                               nprocs=nproc, join=True, start_method="spawn")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            errors = sorted(out.glob("error-*.json"))
            if errors:
                first = json.loads(errors[0].read_text())
                rank = errors[0].stem.split("-")[1]
                msg = f"rank {rank}: {first['message']}"
                if first["type"] == "TrainingError":
                    raise TrainingError(msg) from None
                raise TrainingError(f"distributed training failed on {msg} ({first['type']})") from None
            raise TrainingError(f"distributed training failed: {str(exc).strip().splitlines()[-1]}") from None
        results = {}
        for r in range(nproc):
            path = out / f"result-{r}.pkl"
            if not path.exists():
                raise TrainingError(f"rank {r} finished without a result")
            with open(path, "rb") as fh:
                results[r] = pickle.load(fh)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    main = results[0]
    ranks = [main.pop("distributed_rank", {"rank": 0}), *(results[r] for r in range(1, nproc))]
    finals = {r.get("weights_sha256", [None])[-1] for r in ranks}
    if len(finals) != 1:
        raise TrainingError(f"ranks finished with different weights: {finals}")
    main["distributed"] = {"world_size": nproc, "backend": "nccl" if device.startswith("cuda") else "gloo",
                           "ranks": ranks}
    return main
