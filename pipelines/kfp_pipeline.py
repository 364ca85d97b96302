"""The training pipeline (Kubeflow Pipelines v2): validate → train → evaluate → compare → register → policy.

One linear graph runs in two places:

* **On a Kubeflow cluster** (``cxr pipeline submit --host URL``): every component runs in the container
  image ``covid-cxr:latest`` built from the repository's ``Dockerfile`` (the project and its pinned
  dependencies installed; no ``pip install`` at run time, so clusters without internet work —
  kubeflow/pipelines #6738; build it with the CUDA ``TORCH_INDEX`` for GPU nodes). Push it to a
  registry the cluster can pull from and pass ``cxr pipeline submit --image REF`` (every task then
  runs REF; the committed YAML keeps the default). The image holds no ``data/`` (``.dockerignore``):
  the pods need ``CXR_PROJECT_ROOT`` pointing at a checkout of the repository with ``data/*.dvc`` and
  ``.dvc/config`` (a volume or a git-sync init container). The training task submits a Kubeflow Trainer
  ``TrainJob`` (torch-distributed runtime; ``train_nodes`` x ``gpus_per_node`` GPUs, DDP) and waits for it
  (pipelines/trainjob.py); its pods get the database and MLflow URLs from the ``cxr-secrets`` Secret. Each task is a fresh
  pod: it fetches the dataset version with ``dvc pull`` and talks to a shared MLflow server, so the
  pods need ``CXR_MLFLOW_TRACKING_URI`` (or ``MLFLOW_TRACKING_URI``), the DVC remote and its
  credentials (``AWS_*`` for S3/MinIO) and ``CXR_DATABASE_URL`` (the audit trail) in their
  environment — set them in the image or with a Kubeflow ``PodDefault`` for the profile; they are
  deliberately not compiled into the YAML (no secrets in the pipeline spec).
* **Locally** (``cxr pipeline run --local``): kfp's ``SubprocessRunner(use_venv=False)`` runs each
  lightweight component with the current interpreter, where the project is installed (editable),
  fully offline. The local runner ignores resource requests and supports no ``dsl.If``/
  ``ParallelFor``/``ExitHandler``/caching (kubeflow/pipelines #11793), so the graph stays linear and
  the conditions live inside the components.

Components pass one small JSON string (the run *state*) from task to task; every artefact lands in
MLflow: a pipeline run (experiment ``covid-cxr-pipelines``) holds the parameters, lineage, validation,
evaluations, champion-vs-challenger comparison and the policy result, and the training run gets the
same lineage. The pipeline never approves a model: it leaves a ``candidate`` with alias
``challenger``; approval stays a human, e-signed act (``cxr model approve``).

The component bodies are tiny and import ``pipelines.pipeline_steps`` (which does not import kfp's
compiler: inside a running component kfp's ``dsl`` is import-restricted), so the compiled YAML
(``pipelines/compiled/covid_cxr_training.yaml``) only changes when the graph or its interface does.
"""
# no `from __future__ import annotations`: kfp reads the component annotations at runtime
import json
import os
import sys
from pathlib import Path

from kfp import compiler, dsl

from pipelines.pipeline_steps import ENV_PACKAGES, PIPELINE_EXPERIMENT, PIPELINE_NAME  # noqa: F401

PIPELINE_DESCRIPTION = (
    "COVID-19 CXR + vitals: validate dataset version -> train (GPU on a cluster) -> evaluate (internal "
    "test + external sets, with CIs) -> compare with the champion -> register challenger (candidate) -> "
    "release-policy check. Never approves: approval is a human e-signature."
)
from pipelines.images import BASE_IMAGE  # noqa: E402 - built from the Dockerfile (project + pinned deps)

COMPILED_YAML = Path(__file__).resolve().parent / "compiled" / "covid_cxr_training.yaml"

# Resources the tasks ask for on a cluster (ignored by the local runner). The training GPUs are requested by
# the Kubeflow Trainer TrainJob the train task submits (pipelines/trainjob.py), not by the task itself.
STEP_CPU_REQUEST = "1"
STEP_MEMORY_REQUEST = "4G"



# --------------------------------------------------------------------------------------------
# Components (lightweight Python; bodies import the installed project)
# --------------------------------------------------------------------------------------------
def _component(func):
    return dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)(func)


@_component
def validate_dataset(dataset_name: str, external_datasets: str, params: str) -> str:
    """Check the dataset version (DVC hash), schema, split sizes and label balance; open the MLflow run."""
    from pipelines.pipeline_steps import step_validate

    return step_validate(dataset_name, external_datasets, params)


@_component
def train_model(state: str) -> str:
    """Train the challenger: on a cluster as a Kubeflow Trainer TrainJob (nodes x GPUs, DDP), waiting for it;
    in-process under the local runner."""
    from pipelines.pipeline_steps import step_train

    return step_train(state)


@_component
def evaluate_model(state: str) -> str:
    """Evaluate the challenger on the internal test split and every external dataset, with CIs."""
    from pipelines.pipeline_steps import step_evaluate

    return step_evaluate(state)


@_component
def compare_with_champion(state: str) -> str:
    """Champion vs challenger on the same test sets, per variant tag, with bootstrap CIs of differences."""
    from pipelines.pipeline_steps import step_compare

    return step_compare(state)


@_component
def register_challenger(state: str) -> str:
    """Mark the new version ``status=candidate`` and point alias ``challenger`` at it (never champion)."""
    from pipelines.pipeline_steps import step_register

    return step_register(state)


@_component
def check_policy(state: str) -> str:
    """Run the release-policy check and record the result; approval stays human."""
    from pipelines.pipeline_steps import step_policy

    return step_policy(state)


def _small(task) -> None:
    task.set_cpu_request(STEP_CPU_REQUEST).set_memory_request(STEP_MEMORY_REQUEST)


@_component
def bundle_params(epochs: int, image_size: int, encoder: str, batch_size: int, seed: int,
                 target_sensitivity: float, actor: str, n_bootstrap: int, min_train: int, min_val: int,
                 min_test: int, min_class_fraction: float, train_launcher: str, train_nodes: int,
                 gpus_per_node: int, train_image: str) -> str:
    """Bundle the run parameters into one JSON string (the first link of the linear chain)."""
    import json

    return json.dumps({
        "epochs": epochs, "image_size": image_size, "encoder": encoder, "batch_size": batch_size,
        "seed": seed, "target_sensitivity": target_sensitivity, "actor": actor, "n_bootstrap": n_bootstrap,
        "min_train": min_train, "min_val": min_val, "min_test": min_test,
        "min_class_fraction": min_class_fraction, "train_launcher": train_launcher, "train_nodes": train_nodes,
        "gpus_per_node": gpus_per_node, "train_image": train_image,
    }, sort_keys=True)


@dsl.pipeline(name=PIPELINE_NAME, description=PIPELINE_DESCRIPTION)
def covid_cxr_training(
    dataset_name: str = "cohort",
    external_datasets: str = "[]",
    epochs: int = 15,
    image_size: int = 224,
    encoder: str = "densenet121",
    batch_size: int = 16,
    seed: int = 42,
    target_sensitivity: float = 0.9,
    actor: str = "pipeline",
    n_bootstrap: int = 1000,
    min_train: int = 20,
    min_val: int = 4,
    min_test: int = 6,
    min_class_fraction: float = 0.05,
    train_launcher: str = "trainjob",
    train_nodes: int = 1,
    gpus_per_node: int = 1,
    train_image: str = BASE_IMAGE,
) -> str:
    """The graph is linear on purpose (kfp local runner limits); decisions happen inside components.

    ``train_launcher``: ``trainjob`` (cluster: a Kubeflow Trainer TrainJob of ``train_nodes`` x ``gpus_per_node``
    on the torch-distributed runtime, pipelines/trainjob.py) or ``inprocess`` (the local runner)."""
    params = bundle_params(
        epochs=epochs, image_size=image_size, encoder=encoder, batch_size=batch_size, seed=seed,
        target_sensitivity=target_sensitivity, actor=actor, n_bootstrap=n_bootstrap, min_train=min_train,
        min_val=min_val, min_test=min_test, min_class_fraction=min_class_fraction, train_launcher=train_launcher,
        train_nodes=train_nodes, gpus_per_node=gpus_per_node, train_image=train_image,
    )
    validate = validate_dataset(dataset_name=dataset_name, external_datasets=external_datasets, params=params.output)
    validate.set_display_name("validate dataset version")
    _small(validate)

    train = train_model(state=validate.output)
    train.set_display_name("train (Kubeflow Trainer TrainJob: nodes x GPUs)")
    _small(train)  # it submits and waits: the GPUs belong to the TrainJob's pods

    evaluate = evaluate_model(state=train.output)
    evaluate.set_display_name("evaluate (internal + external)")
    _small(evaluate)

    compare = compare_with_champion(state=evaluate.output)
    compare.set_display_name("compare with champion")
    _small(compare)

    register = register_challenger(state=compare.output)
    register.set_display_name("register challenger (candidate)")
    _small(register)

    policy = check_policy(state=register.output)
    policy.set_display_name("release-policy check (no auto-approval)")
    _small(policy)
    return policy.output


def compile_pipeline(out: Path | str = COMPILED_YAML) -> Path:
    """Compile the pipeline to IR YAML (deterministic: no timestamps or local paths in it)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_func=covid_cxr_training, package_path=str(out))
    return out


# --------------------------------------------------------------------------------------------
# Local run
# --------------------------------------------------------------------------------------------
def run_local(*, dataset_name: str, external_datasets: list[str] | None = None, epochs: int = 2,
              image_size: int = 64, encoder: str = "small", batch_size: int = 8, seed: int = 42,
              target_sensitivity: float = 0.9, actor: str = "pipeline", n_bootstrap: int = 500,
              min_train: int = 10, min_val: int = 2, min_test: int = 4, min_class_fraction: float = 0.05,
              workdir: Path | None = None) -> dict:
    """Run the pipeline with kfp's local SubprocessRunner in this interpreter (offline). Returns the state."""
    from kfp import local

    from core.config import get_settings

    workdir = Path(workdir or get_settings().state_dir / "kfp-local")
    workdir.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir / "outputs"),
               workspace_root=str(workdir / "workspace"), raise_on_error=True)
    # The subprocesses inherit this environment: state folder and project root stay the same.
    os.environ.setdefault("CXR_HOME", str(get_settings().state_dir))
    os.environ.setdefault("CXR_PROJECT_ROOT", str(get_settings().project_root))
    task = covid_cxr_training(
        dataset_name=dataset_name, external_datasets=json.dumps(list(external_datasets or [])), epochs=epochs,
        image_size=image_size, encoder=encoder, batch_size=batch_size, seed=seed,
        target_sensitivity=target_sensitivity, actor=actor, n_bootstrap=n_bootstrap, min_train=min_train,
        min_val=min_val, min_test=min_test, min_class_fraction=min_class_fraction, train_launcher="inprocess",
    )
    out = task.output if hasattr(task, "output") else task.outputs["Output"]
    return json.loads(out)


if __name__ == "__main__":  # python -m pipelines.kfp_pipeline → compile
    print(compile_pipeline(sys.argv[1] if len(sys.argv) > 1 else COMPILED_YAML))
