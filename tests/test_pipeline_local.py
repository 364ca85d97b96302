"""`cxr pipeline run --local`: the real kfp local runner (SubprocessRunner(use_venv=False)), offline, on CPU.

A 30-patient synthetic cohort at 64 px, small encoder, 2 epochs. The run must leave in MLflow a
registered candidate with alias `challenger`, its evaluation, the champion comparison and the
lineage (DVC dataset version, git commit, parameters, seed, package versions), plus a `pipeline.run`
audit event; it must never approve. Then `cxr reproduce` re-trains from that lineage.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from typer.testing import CliRunner

from tests._pipeline_fixtures import TINY, TINY_VALIDATION, import_cohort, researcher_env


def _artifact(client, run_id: str, path: str):
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(run_id, path, tmp))
        return json.loads(local.read_text()) if local.suffix == ".json" else local.read_text()


def test_local_run_registers_a_challenger_with_evaluation_comparison_and_lineage(cxr_env: Path) -> None:
    from app.cli import root
    from compliance.audit import list_events, verify_chain
    from core.config import get_settings
    from models.registry import client as mlflow_client
    from pipelines.kfp_pipeline import ENV_PACKAGES, run_local

    version = import_cohort(cxr_env, "cohort", patients=30, seed=3)
    state = run_local(dataset_name="cohort", actor="rita", n_bootstrap=200, **TINY, **TINY_VALIDATION)

    client = mlflow_client()
    name = get_settings().registered_model_name
    v = state["model_version"]
    mv = client.get_model_version(name, v)
    assert mv.tags["status"] == "candidate"
    assert str(client.get_model_version_by_alias(name, "challenger").version) == v
    # the pipeline never makes a champion: the registered model's only alias is the challenger
    # (the sqlite store reports alias -> version as an int, hence str())
    aliases = {a: str(ver) for a, ver in client.get_registered_model(name).aliases.items()}
    assert "champion" not in aliases, aliases
    assert aliases == {"challenger": v}, aliases
    assert "champion" not in (mv.aliases or [])
    assert mv.tags["dataset_version"] == version["dataset_version"]

    # the pipeline's own MLflow run: finished, with every artefact
    prun = client.get_run(state["pipeline_run_id"])
    assert prun.info.status == "FINISHED"
    assert prun.data.tags["dataset_version"] == version["dataset_version"]
    assert prun.data.params["seed"] == str(TINY["seed"]) and prun.data.params["epochs"] == str(TINY["epochs"])
    validation = _artifact(client, prun.info.run_id, "validation/validation.json")
    assert validation["ok"] is True
    evaluation = _artifact(client, prun.info.run_id, "evaluation/cohort__test.json")
    sens = evaluation["covid19_vs_rest"]["sensitivity"]
    assert set(sens) >= {"value", "ci_low", "ci_high"}
    comparison = _artifact(client, prun.info.run_id, "comparison/comparison.json")
    assert comparison["challenger_version"] == v and comparison["champion_version"] is None
    assert "cohort:test" in comparison["test_sets"]
    assert "all" in comparison["test_sets"]["cohort:test"]["groups"]
    assert "# Champion vs challenger" in _artifact(client, prun.info.run_id, "comparison/comparison.md")
    policy = _artifact(client, prun.info.run_id, "policy/policy.json")
    # tiny data: it may well fail; whatever the verdict, it is the conjunction of the criteria and nobody approves
    assert isinstance(policy, dict) and policy.get("error") is None, policy
    assert isinstance(policy["passed"], bool)
    assert isinstance(policy["criteria"], list) and policy["criteria"]
    assert all(isinstance(c["passed"], bool) for c in policy["criteria"])
    assert policy["passed"] == all(c["passed"] for c in policy["criteria"])
    assert policy["failed_criteria"] == [c["id"] for c in policy["criteria"] if not c["passed"]]
    assert policy["version"] == v
    assert prun.data.tags["policy_passed"] == str(policy["passed"])
    mv_after = client.get_model_version(name, v)
    assert mv_after.tags["status"] == "candidate"
    assert "champion" not in dict(client.get_registered_model(name).aliases)

    # lineage on the training run
    trun = client.get_run(state["training_run_id"])
    tags = trun.data.tags
    assert tags["lineage.dataset_version"] == version["dataset_version"]
    assert tags["lineage.seed"] == str(TINY["seed"])
    assert tags["lineage.git_commit"]
    for pkg in ["torch", "monai", "mlflow", "dvc", "kfp", "numpy", "python"]:
        assert tags.get(f"env.{pkg}"), pkg
    lineage = _artifact(client, trun.info.run_id, "lineage/lineage.json")
    assert lineage["parameters"]["encoder"] == "small" and lineage["dvc_md5"] == version["dvc_md5"]
    assert set(ENV_PACKAGES) - {"covid-cxr", "pydicom", "pandas", "scikit-learn"} <= set(lineage["environment"])
    assert _artifact(client, trun.info.run_id, "comparison/comparison.json")["challenger_version"] == v

    # audit: one finished pipeline.run naming the version, dataset version and commit; chain intact
    events = [e for e in list_events(action="pipeline.run")]
    assert len(events) == 1
    d = events[0]["details"] if isinstance(events[0], dict) else json.loads(events[0].details)
    assert d["status"] == "finished" and d["model_version"] == v
    assert d["status_tag"] == "candidate" and d["alias"] == "challenger"
    assert d["policy_passed"] == policy["passed"] and d["champion_version"] is None
    assert d["dataset_version"] == version["dataset_version"]
    assert verify_chain().ok

    # reproduce from the recorded lineage (same data version, parameters, seed) within tolerance
    res = CliRunner().invoke(root, ["reproduce", state["training_run_id"], "--tolerance", "0.02", "--json"],
                             env=researcher_env())
    assert res.exit_code == 0, res.output
    out, _ = json.JSONDecoder().raw_decode(res.stdout[res.stdout.index("{"):])
    assert out["within_tolerance"] and out["dataset_version"] == version["dataset_version"]
    assert {r["metric"] for r in out["metrics"]} == {"auroc", "sensitivity", "specificity"}


def test_run_without_local_or_with_a_missing_dataset_fails_clearly(cxr_env: Path) -> None:
    from app.cli import root

    env = researcher_env()
    res = CliRunner().invoke(root, ["pipeline", "run"], env=env)
    assert res.exit_code == 2 and "submit --host" in res.output
    res = CliRunner().invoke(root, ["pipeline", "run", "--local", "--dataset", "nope"], env=env)
    assert res.exit_code == 1 and "pipeline run failed" in res.output
    assert "Traceback" not in res.output.split("pipeline run failed")[-1]


def test_reproduce_comparison_flags_metrics_outside_the_tolerance() -> None:
    from pipelines.reproduce import compare_metrics

    recorded = {"covid19_vs_rest": {"auroc": {"value": 0.80}, "sensitivity": {"value": 0.90},
                                    "specificity": {"value": 0.70}}}
    same = {"auroc": {"value": 0.81}, "sensitivity": {"value": 0.90}, "specificity": {"value": 0.69}}  # train() summary
    rows, ok = compare_metrics(recorded, same, 0.02)
    assert ok and [r["within"] for r in rows] == [True, True, True]
    drifted = {"covid19_vs_rest": {"auroc": {"value": 0.80}, "sensitivity": {"value": 0.85},
                                   "specificity": {"value": 0.70}}}
    rows, ok = compare_metrics(recorded, drifted, 0.02)
    assert not ok and [r["metric"] for r in rows if not r["within"]] == ["sensitivity"]
    rows, ok = compare_metrics(recorded, {}, 0.02)  # a metric that disappeared is not reproduced
    assert not ok


def test_reproduce_unknown_run_fails_clearly(cxr_env: Path) -> None:
    from app.cli import root

    res = CliRunner().invoke(root, ["reproduce", "0123456789abcdef0123456789abcdef"], env=researcher_env())
    assert res.exit_code == 1 and "not found" in res.output and "Traceback" not in res.output
