"""The pipeline's training step as a Kubeflow Trainer TrainJob (pipelines/trainjob.py), offline.

No cluster exists here. The TrainJob body is built by the Kubeflow SDK's own code (``KubernetesBackend.train``)
and its content is checked; the committed example (``pipelines/compiled/train_job.yaml``) must be current.
``run_train_job`` goes through the real ``TrainerClient`` methods (get_runtime, train, wait_for_job_status);
**only the Kubernetes API calls are mocked** (``_FakeClusterApi`` below: it serves a torch-distributed
ClusterTrainingRuntime, records the created TrainJob, and reports it Complete or Failed). The MLflow side is
real: the run rank 0 would have tagged is created in the test's MLflow store.
"""
from __future__ import annotations

import json
import shlex
from datetime import datetime, timezone

import pytest
import yaml

from pipelines.kfp_pipeline import BASE_IMAGE
from pipelines.trainjob import COMPILED_JOB, JOB_TAG, SECRET_ENV, SECRET_NAME, trainjob_body

KW = {"epochs": 3, "image_size": 64, "encoder": "small", "batch_size": 8, "seed": 1, "actor": "rita",
      "n_bootstrap": 10, "target_sensitivity": 0.9}


def _script(body: dict) -> str:
    cmd = body["spec"]["trainer"]["command"]
    assert cmd[:2] == ["bash", "-c"]
    return cmd[2]


def test_trainjob_body_nodes_gpus_runtime_image_and_secrets():
    body = trainjob_body("cohort", KW, nodes=3, gpus_per_node=4, image="reg.example/covid-cxr:gpu")
    assert (body["apiVersion"], body["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    spec = body["spec"]
    assert spec["runtimeRef"] == {"kind": "ClusterTrainingRuntime", "name": "torch-distributed"}
    tr = spec["trainer"]
    assert tr["numNodes"] == 3 and tr["image"] == "reg.example/covid-cxr:gpu"
    for part in ("requests", "limits"):
        assert str(tr["resourcesPerNode"][part]["nvidia.com/gpu"]) == "4"
    # torchrun runs the shipped entry function, which calls models.train.train on CUDA with the pipeline's kwargs
    script = _script(body)
    assert 'torchrun "trainjob.py"' in script and "from pipelines.lifecycle import train_and_record" in script  # audited ranks
    call = script[script.index("cxr_trainjob_entry(**"):].splitlines()[0]
    args = eval(call[len("cxr_trainjob_entry(**"):-1], {})  # the SDK renders the kwargs as a Python literal
    assert args["dataset_name"] == "cohort" and args["job_name"] == body["metadata"]["name"]
    assert json.loads(args["train_kwargs_json"]) == {**KW, "device": "cuda"}
    # the heredoc the SDK writes the script with is unquoted: nothing in it may expand in bash
    body_of_script = script.split("<< EOM", 1)[1].split("\nEOM", 1)[0]
    assert "$" not in body_of_script and "`" not in body_of_script
    # nothing is installed at run time; the secrets come from the Secret, never as values
    assert "pip install" not in script
    env = {e["name"]: e for e in tr.get("env", [])}
    assert not set(SECRET_ENV) & set(env)
    patch = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    container = patch["template"]["spec"]["template"]["spec"]["containers"][0]
    assert patch["name"] == container["name"] == "node"
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert refs == {k: {"name": SECRET_NAME, "key": v} for k, v in SECRET_ENV.items()}
    assert "postgresql" not in json.dumps(body) and "password" not in json.dumps(body).lower()


def test_cpu_only_trainjob_and_bad_sizes():
    body = trainjob_body("cohort", KW, nodes=2, gpus_per_node=0, image=BASE_IMAGE)
    assert "nvidia.com/gpu" not in body["spec"]["trainer"]["resourcesPerNode"]["limits"]
    assert '\\"device\\": \\"cpu\\"' in json.dumps(_script(body)) or '"device": "cpu"' in _script(body)
    with pytest.raises(ValueError, match="train_nodes must be at least 1"):
        trainjob_body("cohort", KW, nodes=0, gpus_per_node=1, image=BASE_IMAGE)


def test_committed_trainjob_example_is_current(tmp_path):
    from pipelines.trainjob import write_compiled_job

    fresh = write_compiled_job(tmp_path / "train_job.yaml").read_text()
    assert COMPILED_JOB.exists() and COMPILED_JOB.read_text() == fresh, \
        "pipelines/compiled/train_job.yaml is stale: regenerate with `python -m pipelines.trainjob`"
    doc = yaml.safe_load(fresh)
    assert doc["spec"]["trainer"]["numNodes"] == 2 and doc["spec"]["trainer"]["image"] == BASE_IMAGE


# ------------------------------------------------------------------ submission through TrainerClient
class _Async:
    def __init__(self, value):
        self.value = value

    def get(self, timeout=None):
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value


class _PodList:
    def to_dict(self):
        return {"items": []}


class _FakeClusterApi:
    """MOCK of the Kubernetes API (CustomObjectsApi + CoreV1Api) — the only mocked part of this test."""

    def __init__(self, outcome: str) -> None:
        self.outcome, self.created = outcome, []

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, async_req=False):
        from kubernetes.client import ApiException

        if plural == "trainingruntimes":
            return _Async(ApiException(status=404))
        body = dict(self.created[-1])
        body["metadata"] = {**body["metadata"], "namespace": namespace,
                            "creationTimestamp": datetime.now(timezone.utc).isoformat()}
        body["status"] = {"conditions": [{"type": self.outcome, "status": "True", "reason": "x", "message": "x",
                                          "lastTransitionTime": datetime.now(timezone.utc).isoformat()}]}
        return _Async(body)

    def get_cluster_custom_object(self, group, version, plural, name, async_req=False):
        assert (plural, name) == ("clustertrainingruntimes", "torch-distributed")
        return _Async({
            "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "ClusterTrainingRuntime",
            "metadata": {"name": name, "labels": {"trainer.kubeflow.org/framework": "torch"}},
            "spec": {"mlPolicy": {"numNodes": 1, "torch": {"numProcPerNode": "auto"}},
                     "template": {"spec": {"replicatedJobs": [{
                         "name": "node", "replicas": 1,
                         "template": {"metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                                      "spec": {"template": {"spec": {"containers": [
                                          {"name": "node", "image": "pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime"}]}}}}}]}}}})

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **_):
        assert (group, plural) == ("trainer.kubeflow.org", "trainjobs")
        self.created.append(json.loads(json.dumps(body, default=str)))
        return body

    def list_namespaced_pod(self, namespace, label_selector=None, async_req=False):
        return _Async(_PodList())


def _client(api: _FakeClusterApi):
    from kubeflow.trainer import TrainerClient
    from kubeflow.trainer.backends.kubernetes.backend import KubernetesBackend

    backend = KubernetesBackend.__new__(KubernetesBackend)
    backend.custom_api = backend.core_api = api
    backend.namespace = "kubeflow-user"
    client = TrainerClient.__new__(TrainerClient)
    client.backend = backend
    return client


def _tagged_run(job_name: str, version: str = "7") -> str:
    """What rank 0 leaves in MLflow at the end of a TrainJob (train() sets model_version; the entry tags the job)."""
    import mlflow

    from models.registry import configure_mlflow

    configure_mlflow()
    with mlflow.start_run() as run:
        mlflow.set_tags({"model_version": version, "dataset_version": "abc123", JOB_TAG: job_name})
    return run.info.run_id


def test_run_train_job_submits_waits_and_reads_the_result(cxr_env, monkeypatch):
    import pipelines.trainjob as tj

    api = _FakeClusterApi("Complete")
    monkeypatch.setattr(tj, "new_job_name", lambda: "cxr-train-t1")
    run_id = _tagged_run("cxr-train-t1")
    _tagged_run("cxr-train-other", version="8")  # another job's run is not picked up
    out = tj.run_train_job("cohort", KW, nodes=2, gpus_per_node=2, image=BASE_IMAGE, poll_seconds=1,
                           timeout_seconds=5, trainer_client=_client(api))
    assert out == {"model_version": "7", "run_id": run_id, "dataset_version": "abc123", "job_name": "cxr-train-t1"}
    (body,) = api.created
    # what was submitted is what trainjob_body builds offline (the committed example's generator)
    expected = trainjob_body("cohort", KW, nodes=2, gpus_per_node=2, image=BASE_IMAGE, job_name="cxr-train-t1",
                             deadline_seconds=5)
    assert {k: v for k, v in body.items() if v is not None} == expected


def test_run_train_job_failure_and_missing_result_are_clear(cxr_env, monkeypatch):
    import pipelines.trainjob as tj

    monkeypatch.setattr(tj, "new_job_name", lambda: "cxr-train-t2")
    with pytest.raises(RuntimeError, match="TrainJob cxr-train-t2 failed"):
        tj.run_train_job("cohort", KW, nodes=1, gpus_per_node=1, image=BASE_IMAGE, poll_seconds=1,
                         timeout_seconds=5, trainer_client=_client(_FakeClusterApi("Failed")))
    with pytest.raises(RuntimeError, match="0 MLflow runs carry cxr.trainjob=cxr-train-t2"):
        tj.run_train_job("cohort", KW, nodes=1, gpus_per_node=1, image=BASE_IMAGE, poll_seconds=1,
                         timeout_seconds=5, trainer_client=_client(_FakeClusterApi("Complete")))


def test_script_is_valid_bash_and_python():
    """The command the pods run parses (bash -n) and the shipped Python compiles."""
    import subprocess

    body = trainjob_body("cohort", KW, nodes=1, gpus_per_node=1, image=BASE_IMAGE)
    script = _script(body)
    assert subprocess.run(["bash", "-n", "-c", script], capture_output=True).returncode == 0
    py = script.split("<< EOM", 1)[1].split("\nEOM", 1)[0]
    compile(py, "trainjob.py", "exec")
    assert shlex.split('torchrun "trainjob.py"') == ["torchrun", "trainjob.py"]
