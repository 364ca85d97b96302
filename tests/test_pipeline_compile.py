"""The committed IR YAML is what the code compiles to; it asks for a GPU; nothing installs at run time."""
from __future__ import annotations

from pathlib import Path

import yaml

from pipelines.kfp_pipeline import BASE_IMAGE, COMPILED_YAML, compile_pipeline

REGENERATE = "regenerate it with `cxr pipeline compile` (and commit the YAML)"


def test_committed_yaml_matches_fresh_compile(tmp_path: Path) -> None:
    fresh = compile_pipeline(tmp_path / "fresh.yaml").read_text()
    assert COMPILED_YAML.exists(), f"{COMPILED_YAML} missing: {REGENERATE}"
    assert COMPILED_YAML.read_text() == fresh, f"{COMPILED_YAML} is stale: {REGENERATE}"


def test_compile_is_deterministic(tmp_path: Path) -> None:
    a = compile_pipeline(tmp_path / "a.yaml").read_text()
    b = compile_pipeline(tmp_path / "b.yaml").read_text()
    assert a == b
    assert str(tmp_path) not in a and "/work/" not in a  # no local paths baked in


def _spec() -> dict:
    return yaml.safe_load(COMPILED_YAML.read_text())


def test_no_task_requests_a_gpu_the_trainjob_does() -> None:
    """The train task submits a Kubeflow Trainer TrainJob and waits: the GPUs are the TrainJob's (nodes x
    gpus_per_node, pipeline parameters; tests/test_trainjob.py checks its body)."""
    spec = _spec()
    executors = spec["deploymentSpec"]["executors"]
    assert [n for n, e in executors.items() if "accelerator" in e["container"].get("resources", {})] == []
    train_exec = spec["root"]["dag"]["tasks"]["train-model"]["componentRef"]["name"].replace("comp-", "exec-")
    assert executors[train_exec]["container"]["resources"].get("resourceCpuRequest")  # a small launcher pod
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["train_launcher"]["defaultValue"] == "trainjob"
    assert (params["train_nodes"]["defaultValue"], params["gpus_per_node"]["defaultValue"]) == (1, 1)
    assert params["train_image"]["defaultValue"] == BASE_IMAGE


def test_components_install_nothing_at_run_time_and_use_the_project_image() -> None:
    spec = _spec()
    for name, ex in spec["deploymentSpec"]["executors"].items():
        c = ex["container"]
        text = " ".join(c["command"] + c.get("args", []))
        assert "pip install" not in text and "pip3 install" not in text, name
        assert c["image"] == BASE_IMAGE, name


def test_graph_is_linear_in_the_documented_order() -> None:
    tasks = _spec()["root"]["dag"]["tasks"]
    order = ["bundle-params", "validate-dataset", "train-model", "evaluate-model", "compare-with-champion",
             "register-challenger", "check-policy"]
    assert set(tasks) == set(order)
    for before, after in zip(order, order[1:]):
        assert tasks[after].get("dependentTasks") == [before], after
    # no conditions, loops or exit handlers (kfp's local runner cannot run them)
    assert all("triggerPolicy" not in t and "iteratorPolicy" not in t for t in tasks.values())
