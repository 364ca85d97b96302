"""The pipeline's training step on a cluster: a Kubeflow Trainer ``TrainJob`` on the ``torch-distributed`` runtime.

The kfp ``train_model`` task no longer trains in its own pod on a cluster: it submits a TrainJob through the
Kubeflow SDK (``kubeflow.trainer.TrainerClient``) with a ``CustomTrainer`` — ``nodes`` pods, each asking for
``gpus_per_node`` GPUs — and waits for it. The torch-distributed runtime runs ``torchrun`` on every node
(one process per GPU), so ``models.train.train`` finds torchrun's environment and trains as DDP
(``models.distributed``): rank 0 alone logs to MLflow and registers the version. The task then reads the
result back from MLflow (the training run carries the tag ``cxr.trainjob=<job name>``).

- Image: the project image (``BASE_IMAGE``, built from the repository's Dockerfile with CUDA torch); nothing is
  pip-installed at run time (clusters without internet, kubeflow/pipelines #6738).
- Secrets: ``CXR_DATABASE_URL`` and ``CXR_MLFLOW_TRACKING_URI`` come from the Kubernetes Secret ``cxr-secrets``
  (keys ``database-url``, ``mlflow-tracking-uri``; deploy/k8s/) through a runtime patch of the ``node``
  container — never as literal values in the job body.
- Data: every node fetches the dataset version its ``data/<name>.dvc`` names (``ensure_dataset_present``);
  ``CXR_PROJECT_ROOT`` must point at a checkout (see pipelines/kfp_pipeline.py).

``trainjob_body(...)`` builds the exact body ``TrainerClient.train`` submits, offline: it runs the SDK's own
``KubernetesBackend.train`` with a described runtime and a stand-in that records the create call instead of
reaching a cluster. ``pipelines/compiled/train_job.yaml`` is that body for the default parameters (committed;
tests/test_trainjob.py checks it is current).
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

RUNTIME = "torch-distributed"
SECRET_NAME = "cxr-secrets"
SECRET_ENV = {"CXR_DATABASE_URL": "database-url", "CXR_MLFLOW_TRACKING_URI": "mlflow-tracking-uri"}
JOB_TAG = "cxr.trainjob"
TRAINER_CONTAINER = "node"  # the trainer container/replicated job of the torch-distributed runtime
COMPILED_JOB = Path(__file__).resolve().parent / "compiled" / "train_job.yaml"
DEFAULT_JOB_NAME = "cxr-train-example"


def cxr_trainjob_entry(dataset_name: str, train_kwargs_json: str, job_name: str) -> None:
    """Runs on every TrainJob process (torchrun sets RANK/WORLD_SIZE/...). Self-contained: the SDK ships this
    function's source into the pod; the project is installed in the image."""
    import json

    from pipelines.dvc_store import ensure_dataset_present
    from pipelines.lifecycle import train_and_record

    ensure_dataset_present(dataset_name)
    result = train_and_record(dataset_name, **json.loads(train_kwargs_json))  # rank 0 audits the events
    if result.get("model_version") is not None:  # rank 0 registered the version
        from models.registry import client

        client().set_tag(result["run_id"], "cxr.trainjob", job_name)
        print("CXR_TRAIN_RESULT " + json.dumps({k: str(result[k]) for k in ("model_version", "run_id",
                                                                           "dataset_version")}), flush=True)


def new_job_name() -> str:
    return f"cxr-train-{uuid.uuid4().hex[:10]}"


def job_request(dataset_name: str, train_kwargs: dict[str, Any], *, nodes: int, gpus_per_node: int, image: str,
                job_name: str, cpu_per_node: str = "4", memory_per_node: str = "16Gi",
                deadline_seconds: int | None = 24 * 3600):
    """``(CustomTrainer, options)`` for ``TrainerClient.train``; raises ValueError for impossible sizes."""
    from kubeflow.trainer import CustomTrainer
    from kubeflow.trainer.options import ActiveDeadlineSeconds, ContainerPatch, Labels, Name, PodSpecPatch
    from kubeflow.trainer.options.kubernetes import (
        JobSetSpecPatch,
        JobSetTemplatePatch,
        JobSpecPatch,
        JobTemplatePatch,
        PodTemplatePatch,
        ReplicatedJobPatch,
        RuntimePatch,
        TrainingRuntimeSpecPatch,
    )

    if nodes < 1:
        raise ValueError(f"train_nodes must be at least 1, got {nodes}")
    if gpus_per_node < 0:
        raise ValueError(f"gpus_per_node must be 0 or more, got {gpus_per_node}")
    kwargs = dict(train_kwargs, device="cuda" if gpus_per_node else "cpu")
    resources: dict[str, Any] = {"cpu": cpu_per_node, "memory": memory_per_node}
    if gpus_per_node:
        resources["gpu"] = str(gpus_per_node)  # a whole-number quantity ("1", not 1.0)
    trainer = CustomTrainer(
        func=cxr_trainjob_entry,
        func_args={"dataset_name": dataset_name, "train_kwargs_json": json.dumps(kwargs, sort_keys=True),
                   "job_name": job_name},
        image=image, num_nodes=nodes, resources_per_node=resources,
        env={"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "CXR_USER": str(kwargs.get("actor") or
                                                                                      "pipeline")})
    secret_env = [{"name": k, "valueFrom": {"secretKeyRef": {"name": SECRET_NAME, "key": v}}}
                  for k, v in SECRET_ENV.items()]
    patch = RuntimePatch(training_runtime_spec=TrainingRuntimeSpecPatch(template=JobSetTemplatePatch(
        spec=JobSetSpecPatch(replicated_jobs=[ReplicatedJobPatch(name=TRAINER_CONTAINER, template=JobTemplatePatch(
            spec=JobSpecPatch(template=PodTemplatePatch(spec=PodSpecPatch(
                containers=[ContainerPatch(name=TRAINER_CONTAINER, env=secret_env)])))))]))))
    options = [Name(job_name), Labels({"app.kubernetes.io/part-of": "covid-cxr", "cxr/component": "training"}),
               patch]
    if deadline_seconds:
        options.append(ActiveDeadlineSeconds(deadline_seconds))
    return trainer, options


def torch_distributed_runtime(image: str = "pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime"):
    """The ``torch-distributed`` ClusterTrainingRuntime as the SDK sees it (name, kind, torchrun entrypoint):
    what ``TrainerClient.get_runtime("torch-distributed")`` returns on a cluster with Kubeflow Trainer's
    default runtimes installed. Used offline only."""
    from kubeflow.trainer.backends.kubernetes import utils
    from kubeflow.trainer.types import types
    from kubeflow_trainer_api import models

    replicated = [models.JobsetV1alpha2ReplicatedJob.from_dict({
        "name": "node", "replicas": 1,
        "template": {"metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                     "spec": {"template": {"spec": {"containers": [{"name": "node", "image": image}]}}}}})]
    policy = models.TrainerV1alpha1MLPolicy.from_dict({"numNodes": 1, "torch": {"numProcPerNode": "auto"}})
    return types.Runtime(name=RUNTIME, kind=types.RuntimeKind.CLUSTER_TRAINING_RUNTIME,
                         trainer=utils.get_runtime_trainer("torch", replicated, policy))


class _RecordingCustomObjectsApi:
    """Stands in for the Kubernetes API at the one call ``KubernetesBackend.train`` makes (offline body)."""

    def __init__(self) -> None:
        self.created: list[dict] = []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **_kw):
        self.created.append({"group": group, "version": version, "namespace": namespace, "plural": plural,
                             "body": body})
        return body


def trainjob_body(dataset_name: str, train_kwargs: dict[str, Any], *, nodes: int, gpus_per_node: int, image: str,
                  job_name: str = DEFAULT_JOB_NAME, namespace: str = "kubeflow-user", **kw) -> dict:
    """The TrainJob object ``TrainerClient.train`` would create, built by the SDK itself without a cluster."""
    from kubeflow.trainer.backends.kubernetes.backend import KubernetesBackend

    trainer, options = job_request(dataset_name, train_kwargs, nodes=nodes, gpus_per_node=gpus_per_node,
                                   image=image, job_name=job_name, **kw)
    backend = KubernetesBackend.__new__(KubernetesBackend)  # no kube-config, no cluster
    backend.custom_api, backend.core_api, backend.namespace = _RecordingCustomObjectsApi(), None, namespace
    backend.train(runtime=torch_distributed_runtime(image), trainer=trainer, options=options)
    (call,) = backend.custom_api.created
    body = json.loads(json.dumps(call["body"], default=str))
    return {k: v for k, v in body.items() if v is not None}


def run_train_job(dataset_name: str, train_kwargs: dict[str, Any], *, nodes: int, gpus_per_node: int,
                  image: str, namespace: str | None = None, timeout_seconds: int = 24 * 3600,
                  poll_seconds: int = 15, trainer_client=None) -> dict[str, Any]:
    """Submit the TrainJob, wait until it completes (raises when it fails or times out) and return
    ``{"model_version", "run_id", "dataset_version", "job_name"}`` from the MLflow run it registered."""
    from kubeflow.common.types import KubernetesBackendConfig
    from kubeflow.trainer import TrainerClient
    from kubeflow.trainer.constants import constants

    client = trainer_client or TrainerClient(backend_config=KubernetesBackendConfig(namespace=namespace))
    job_name = new_job_name()
    trainer, options = job_request(dataset_name, train_kwargs, nodes=nodes, gpus_per_node=gpus_per_node,
                                   image=image, job_name=job_name, deadline_seconds=timeout_seconds)
    runtime = client.get_runtime(RUNTIME)
    submitted = client.train(runtime=runtime, trainer=trainer, options=options)
    try:
        client.wait_for_job_status(submitted, status={constants.TRAINJOB_COMPLETE}, timeout=timeout_seconds,
                                   polling_interval=poll_seconds)
    except RuntimeError as exc:  # the SDK raises RuntimeError("TrainJob ... is Failed")
        raise RuntimeError(f"TrainJob {submitted} failed: see `kubectl logs -l "
                           f"jobset.sigs.k8s.io/jobset-name={submitted}` ({exc})") from exc
    return {**result_from_mlflow(submitted), "job_name": submitted}


def result_from_mlflow(job_name: str) -> dict[str, str]:
    """The training run rank 0 tagged with ``cxr.trainjob=<job_name>``: its model version and dataset version."""
    from models.registry import EXPERIMENT, client

    c = client()
    exp = c.get_experiment_by_name(EXPERIMENT)
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`{JOB_TAG}` = '{job_name}'") if exp else []
    if len(runs) != 1:
        raise RuntimeError(f"TrainJob {job_name} completed but {len(runs)} MLflow runs carry {JOB_TAG}={job_name} "
                           f"(expected exactly one, from rank 0)")
    tags = runs[0].data.tags
    if not tags.get("model_version"):
        raise RuntimeError(f"TrainJob {job_name}: run {runs[0].info.run_id} registered no model version")
    return {"model_version": tags["model_version"], "run_id": runs[0].info.run_id,
            "dataset_version": tags.get("dataset_version", "")}


def write_compiled_job(out: Path | str = COMPILED_JOB) -> Path:
    """``pipelines/compiled/train_job.yaml``: the body for the pipeline's default parameters (2 nodes x 1 GPU
    in the example, so the distributed parts show), for review next to the compiled pipeline."""
    import yaml

    from pipelines.images import BASE_IMAGE

    example_kwargs = {"epochs": 15, "image_size": 224, "encoder": "densenet121", "batch_size": 16, "seed": 42,
                      "target_sensitivity": 0.9, "actor": "pipeline", "n_bootstrap": 1000}
    body = trainjob_body("cohort", example_kwargs, nodes=2, gpus_per_node=1, image=BASE_IMAGE)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Generated by pipelines.trainjob.write_compiled_job(): the TrainJob the pipeline's training step\n"
                   "# submits (example: dataset 'cohort', 2 nodes x 1 GPU). Regenerate with\n"
                   "#   python -m pipelines.trainjob\n" + yaml.safe_dump(body, sort_keys=True))
    return out


if __name__ == "__main__":  # python -m pipelines.trainjob → regenerate the committed example body
    print(write_compiled_job())
