"""Real data (the public covid-chestxray-dataset): import → train small on CPU → evaluate with CIs.

Marked slow: a few minutes on 2 cores. No quality threshold is asserted — the numbers are whatever
they are (benchmarks/RESULTS.md records a longer run); the test checks the pipeline runs end to end
on real, messy data (unlabelled rows, rare classes, many sites) and reports honest intervals.
"""
from __future__ import annotations

import math

import pytest


@pytest.mark.slow
def test_real_dataset_trains_and_evaluates_with_cis(cxr_env, shared_dataset, monkeypatch):
    import torch

    torch.set_num_threads(2)
    monkeypatch.setenv("CXR_USER", "rita.researcher")
    from models.registry import get_evaluation
    from models.train import train
    from pipelines.ingest import import_dataset

    import_dataset(shared_dataset, "public", seed=42, track=False, quiet=True, workers=2)
    r = train("public", epochs=3, image_size=64, encoder="small", batch_size=16, device="cpu", seed=1,
              n_bootstrap=300, show_progress=False)
    ev = get_evaluation(r["model_version"])
    assert ev["split"] == "test" and ev["n_patients"] >= 20
    a = ev["covid19_vs_rest"]["auroc"]
    assert a["value"] is not None and 0 <= a["ci_low"] <= a["value"] <= a["ci_high"] <= 1
    assert math.isfinite(ev["calibration"]["ece_after"])
    assert len(ev["subgroups"]["site"]) > 5  # many source hospitals, most of them small
    assert any(g["small"] for g in ev["subgroups"]["site"].values())
