"""Distributed data-parallel training (models/distributed.py) with real torch.distributed on gloo (CPU).

1. Two spawned ranks, two optimiser steps on a tiny MLP through the same helpers ``models.train`` uses:
   the shards are disjoint and equal-sized, the weights are identical on both ranks after every step, they
   equal a single process trained on the union of both ranks' batches (what DDP's gradient averaging must
   give), and the weight check does fail when one rank's weights differ.
2. ``cxr train --nproc 2 --device cpu`` end to end, twice on the same synthetic dataset: same metrics, one
   MLflow run and one registered version per invocation (rank 0 alone logs and registers).
3. NCCL / GPU: skipped here (no CUDA on this machine); the skip says so.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _spawn_ranks(world: int, out: Path) -> list[dict]:
    import torch
    import torch.multiprocessing as mp
    from _ddp_worker import run  # spawned children import it again (the parent's sys.path travels with spawn)

    from models.launch import free_port

    mp.start_processes(run, args=(world, free_port(), str(out)), nprocs=world, join=True, start_method="spawn")
    return [torch.load(out / f"rank-{r}.pt", weights_only=False) for r in range(world)]


def test_ddp_two_ranks_gloo_shards_and_weights(tmp_path):
    import torch
    import torch.nn.functional as F
    from _ddp_worker import BATCH, N_ROWS, STEPS, Rows, make_net

    r0, r1 = _spawn_ranks(2, tmp_path)
    assert r0["backend"] == r1["backend"] == "gloo"
    # disjoint, equal shards that cover the rows (N_ROWS divides evenly by 2)
    assert len(r0["epoch0"]) == len(r1["epoch0"]) == N_ROWS // 2 and r0["n_batches"] == r1["n_batches"]
    assert not set(r0["epoch0"]) & set(r1["epoch0"])
    assert set(r0["epoch0"]) | set(r1["epoch0"]) == set(range(N_ROWS))
    assert not set(r0["seen"]) & set(r1["seen"]) and len(r0["seen"]) == STEPS * BATCH
    assert set(r0["seen"]) <= set(r0["epoch0"])
    assert r0["epoch1"] != r0["epoch0"]  # a new permutation each epoch (seeded by seed and epoch)
    # identical weights after every step, and they moved
    assert len(r0["digests"]) == STEPS and r0["digests"] == r1["digests"]
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k
    assert not torch.equal(r0["weights"]["0.weight"], r0["init"]["0.weight"])
    # DDP = one process on the union of both ranks' batches (averaged gradients of equal-sized batches)
    ref = make_net()
    for k in r0["init"]:
        assert torch.equal(ref.state_dict()[k], r0["init"][k])
    rows = Rows()
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for b0, b1 in zip(r0["batches"], r1["batches"]):
        idx = torch.tensor(b0 + b1)
        loss = F.cross_entropy(ref(rows.x[idx]), rows.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(r0["weights"][k], v, rtol=1e-5, atol=1e-6)
    # the check is not vacuous
    assert "weights differ across ranks after the perturbation" in r0["caught"]
    assert r0["caught"] and r1["caught"]


def test_nccl_gpu_path_skips_cleanly_without_cuda():
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip(f"NCCL/GPU DDP path not exercised: {torch.cuda.device_count()} CUDA device(s) here "
                    f"(needs 2); gloo on CPU is tested above")
    assert dist.is_nccl_available()  # pragma: no cover - GPU machines only


def test_nproc_on_cuda_without_gpus_is_a_clear_error(monkeypatch):
    import torch

    from models.launch import launch
    from models.train import TrainingError

    if torch.cuda.device_count() >= 4:
        pytest.skip("this machine has 4 GPUs")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # pretend CUDA exists with too few GPUs
    with pytest.raises(TrainingError, match="needs 4 GPUs"):
        launch(4, "whatever", device="cuda")


def _cxr_train(env: dict, *args: str) -> dict:
    from compliance.users import UserError, create_user, issue_token

    try:  # `cxr train` is a governed action: the trainer authenticates (a researcher's token)
        create_user("ddp.researcher", "researcher", "ddp-researcher-pass-2026", actor="test")
    except UserError:
        pass
    env = {**env, "CXR_TOKEN": issue_token("ddp.researcher", actor="test")}
    proc = subprocess.run([sys.executable, "-c", "from app.cli import main; main()", "train", *args],
                          capture_output=True, text=True, env=env, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_cxr_train_nproc_2_cpu_reproducible_single_run(cxr_env):
    from mlflow import MlflowClient

    from core.config import get_settings
    from pipelines.ingest import import_dataset
    from pipelines.synth import synthesize_cohort

    synthesize_cohort(24, cxr_env / "synth", seed=4, image_size=64)
    import_dataset(cxr_env / "synth", "ddpcohort", seed=4, actor="rita", track=False, quiet=True, workers=1)
    env = {**os.environ, "CXR_USER": "rita", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = ["--dataset", "ddpcohort", "--epochs", "2", "--image-size", "32", "--encoder", "small", "--batch-size",
            "4", "--device", "cpu", "--bootstrap", "0", "--nproc", "2", "--seed", "3", "--json"]
    first = _cxr_train(env, *args)
    second = _cxr_train(env, *args)
    assert (first["model_version"], second["model_version"]) == ("1", "2")
    assert first["run_id"] != second["run_id"]
    assert first["evaluation"] == second["evaluation"]  # same seed, same world size: same model and metrics

    s = get_settings()
    client = MlflowClient(tracking_uri=s.tracking_uri, registry_uri=s.tracking_uri)
    exp = client.get_experiment_by_name("covid-cxr")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted([first["run_id"], second["run_id"]])  # one run each
    by_id = {r.info.run_id: r for r in runs}
    for rid in (first["run_id"], second["run_id"]):
        assert by_id[rid].data.params["world_size"] == "2" and by_id[rid].data.params["distributed_backend"] == "gloo"
    hist = [client.get_metric_history(rid, "train_loss") for rid in (first["run_id"], second["run_id"])]
    assert [[m.value for m in h] for h in hist][0] == [[m.value for m in h] for h in hist][1]
    assert len(hist[0]) == 2  # one value per epoch, logged once (rank 0)
    versions = client.search_model_versions("name='covid-cxr'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]
