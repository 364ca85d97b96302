"""MLflow set-up, the ``covid-cxr`` registry, and loading a version for serving.

Store: ``get_settings().tracking_uri`` — by default SQLite ``CXR_HOME/mlflow.db`` with artefacts in
``CXR_HOME/mlartifacts`` (the experiment is always created with that ``artifact_location``, never
``./mlruns``); ``MLFLOW_TRACKING_URI`` / ``CXR_MLFLOW_TRACKING_URI`` point at a server instead.
Browse it with::

    mlflow ui --backend-store-uri sqlite:///$CXR_HOME/mlflow.db --port 5000   # CXR_HOME default: .cxr

Public API
----------
- ``configure_mlflow(experiment="covid-cxr") -> str`` (experiment id; sets tracking/registry URI)
- ``load_clinical_model(version="champion", device="cpu", expected_sha256=None) -> ClinicalModel``
  (``models.serving``): ``version`` = an alias (``champion``, ``challenger``), ``3``, ``"3"`` or ``"v3"``;
  with ``expected_sha256`` the artefact's digest must match (else ``ArtifactDigestMismatch``).
- ``artifact_sha256(version) -> str``: the digest of the version's artefact as the store holds it now.
- ``get_model_version(v) -> dict`` (name, version, run_id, source, tags, aliases, status)
- ``list_versions() -> list[dict]``, ``resolve_version(v) -> str``
- ``set_alias(alias, version, actor=None)``, ``delete_alias(alias)``, ``set_status(version, status, actor=None)``
  (plain registry operations: governance records the audit events for approvals and alias moves)
- ``get_evaluation(version) -> dict``: the run artefact ``evaluation/evaluation.json`` with
  ``external`` = {dataset: evaluation} from ``evaluation/external/<dataset>.json``;
  ``evaluation_path(version) -> Path`` a local copy of it.

Version tags written at registration: ``status=candidate``, ``dataset_version``, ``dataset_name``,
``git_commit``, ``trained_by``, ``registered_by``, ``run_id``, ``evaluation_artifact``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from core.config import get_settings

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

EXPERIMENT = "covid-cxr"
MODEL_ARTIFACT = "model"
EVALUATION_ARTIFACT = "evaluation/evaluation.json"
EXTERNAL_DIR = "evaluation/external"
STATUSES = ("candidate", "approved", "rejected", "retired")


class RegistryError(LookupError):
    """A version or alias does not exist, or its artefacts cannot be read."""


def _is_remote(uri: str) -> bool:
    return uri.split(":", 1)[0] in ("http", "https", "databricks")


def client():
    from mlflow import MlflowClient

    uri = get_settings().tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def model_name() -> str:
    return get_settings().registered_model_name


def use_project_store() -> str:
    """Point MLflow's process-wide tracking *and* registry URIs at the project's store; returns the URI.

    Both matter: ``models:/`` URIs resolve through the registry URI, and MLflow also builds clients on
    the tracking URI; either one left unset defaults to ./mlflow.db in the working directory (a fresh
    process would find no model, and leave a stray database wherever it was started).
    """
    import mlflow

    uri = get_settings().tracking_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def configure_mlflow(experiment: str = EXPERIMENT) -> str:
    """Point MLflow at the project's store and make sure ``experiment`` exists; returns its id."""
    import mlflow
    from mlflow.exceptions import MlflowException

    settings = get_settings()
    uri = use_project_store()
    c = client()
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        location = None
        if not _is_remote(uri):
            root = settings.mlflow_artifact_root
            root.mkdir(parents=True, exist_ok=True)
            location = (root / experiment).as_uri()
        try:
            exp_id = c.create_experiment(experiment, artifact_location=location)
        except MlflowException:  # created concurrently
            exp_id = c.get_experiment_by_name(experiment).experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def resolve_version(version: str | int) -> str:
    """Version number (str) for ``3``, ``"3"``, ``"v3"``, ``"latest"`` or an alias."""
    return model_version_record(version).version


def model_version_record(version: str | int):
    """The MLflow ``ModelVersion`` for ``3``, ``"3"``, ``"v3"``, ``"latest"`` or an alias (``champion``)."""
    from mlflow.exceptions import MlflowException

    c = client()
    text = str(version).strip()
    if text.lower().startswith("v") and text[1:].isdigit():
        text = text[1:]
    try:
        if text.isdigit():
            return c.get_model_version(model_name(), text)
        if text == "latest":
            versions = c.search_model_versions(f"name='{model_name()}'")
            if not versions:
                raise RegistryError(f"model {model_name()!r} has no version yet")
            return max(versions, key=lambda mv: int(mv.version))
        return c.get_model_version_by_alias(model_name(), text)
    except MlflowException as exc:
        raise RegistryError(f"model {model_name()!r}: version or alias {version!r} not found") from exc


def _as_dict(mv) -> dict[str, Any]:
    tags = dict(mv.tags or {})
    return {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id, "source": mv.source,
            "tags": tags, "aliases": list(mv.aliases or []), "status": tags.get("status"),
            "creation_timestamp": mv.creation_timestamp, "description": mv.description}


def get_model_version(version: str | int) -> dict[str, Any]:
    return _as_dict(model_version_record(version))


def list_versions() -> list[dict[str, Any]]:
    from mlflow.exceptions import MlflowException

    try:
        versions = client().search_model_versions(f"name='{model_name()}'")
    except MlflowException:
        return []
    return [_as_dict(mv) for mv in sorted(versions, key=lambda mv: int(mv.version))]


def set_alias(alias: str, version: str | int, actor: str | None = None) -> None:
    """Point ``alias`` at ``version`` (no audit here: callers record ``alias.changed``)."""
    v = resolve_version(version)
    client().set_registered_model_alias(model_name(), alias, v)


def delete_alias(alias: str) -> None:
    client().delete_registered_model_alias(model_name(), alias)


def set_status(version: str | int, status: str, actor: str | None = None) -> None:
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    v = resolve_version(version)
    c = client()
    c.set_model_version_tag(model_name(), v, "status", status)
    if actor:
        c.set_model_version_tag(model_name(), v, "status_set_by", actor)


def register_version(model_uri: str, *, tags: dict[str, str], description: str = "") -> str:
    """Register ``model_uri`` as a new version of ``covid-cxr``, tag it, return the version."""
    import mlflow

    mv = mlflow.register_model(model_uri, model_name(), await_registration_for=60)
    c = client()
    for k, v in tags.items():
        c.set_model_version_tag(model_name(), mv.version, k, str(v))
    if description:
        c.update_model_version(model_name(), mv.version, description=description)
    return str(mv.version)


# ------------------------------------------------------------------------------------ evaluation
def _local_eval_dir(version: str) -> Path:
    return get_settings().state_dir / "evaluations" / model_name() / f"v{version}"


def evaluation_path(version: str | int) -> Path:
    """A local copy of the version's ``evaluation/evaluation.json`` (downloaded when absent)."""
    mv = model_version_record(version)
    path = _local_eval_dir(mv.version) / "evaluation.json"
    if not path.exists():
        if not mv.run_id:
            raise RegistryError(f"version {mv.version} has no training run")
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="cxr-eval-") as tmp:
            try:
                got = client().download_artifacts(mv.run_id, EVALUATION_ARTIFACT, dst_path=tmp)
            except Exception as exc:  # noqa: BLE001 - MlflowException or OSError by store
                raise RegistryError(f"version {mv.version}: run artefact {EVALUATION_ARTIFACT} not found") from exc
            shutil.copyfile(got, path)
    return path


def get_evaluation(version: str | int) -> dict[str, Any]:
    """Training-time evaluation (test split) + ``external`` = {dataset: evaluation} logged since."""
    mv = model_version_record(version)
    evaluation = json.loads(evaluation_path(mv.version).read_text())
    external = dict(evaluation.get("external") or {}) if isinstance(evaluation.get("external"), dict) else {}
    c = client()
    try:
        infos = c.list_artifacts(mv.run_id, EXTERNAL_DIR)
    except Exception:  # noqa: BLE001
        infos = []
    with tempfile.TemporaryDirectory(prefix="cxr-ext-") as tmp:
        for info in infos:
            if info.is_dir or not info.path.endswith(".json"):
                continue
            external[Path(info.path).stem] = json.loads(Path(c.download_artifacts(mv.run_id, info.path, tmp))
                                                        .read_text())
    evaluation["external"] = external
    return evaluation


def log_external_evaluation(version: str | int, dataset: str, split: str, evaluation: dict,
                            plots: list[Path]) -> None:
    """Log an evaluation of ``version`` on another dataset (or split) on its training run."""
    from models.evaluate import _json_default

    mv = model_version_record(version)
    c = client()
    key = dataset if split in ("all", None) else f"{dataset}__{split}"
    with tempfile.TemporaryDirectory(prefix="cxr-ext-") as tmp:
        p = Path(tmp) / f"{key}.json"
        p.write_text(json.dumps(evaluation, indent=2, default=_json_default))
        # every other dataset goes where the release policy looks; its provenance verdict
        # (evaluation["provenance"]) decides there whether it counts as external validation
        role = evaluation.get("evaluation_role") or ("external" if evaluation.get("is_external", True) else "")
        if role in ("external", "internal-other-dataset"):
            c.log_artifact(mv.run_id, str(p), EXTERNAL_DIR)
        else:
            c.log_artifact(mv.run_id, str(p), "evaluation/reruns")
        for plot in plots:
            c.log_artifact(mv.run_id, str(plot), f"evaluation/plots/{key}")


# --------------------------------------------------------------------------------------- loading
_loaded: dict[tuple[str, str, str, str], Any] = {}


def _download(version: str, dst: Path) -> None:
    import mlflow.artifacts

    settings = get_settings()
    use_project_store()
    mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_name()}/{version}", dst_path=str(dst),
                                        tracking_uri=settings.tracking_uri)


def artifact_sha256(version: str | int) -> str:
    """Digest (``models.serving.artifact_digest``) of a version's artefact as the registry holds it now:
    downloaded afresh (never from the local cache) — what an approval signs."""
    from models.serving import artifact_digest

    mv = model_version_record(version)
    settings = get_settings()
    tmp = Path(tempfile.mkdtemp(prefix="digest-", dir=settings.state_dir))
    try:
        try:
            _download(str(mv.version), tmp)
        except Exception as exc:  # noqa: BLE001 - MlflowException or OSError by store
            raise RegistryError(f"version {mv.version}: model artefact could not be downloaded "
                                f"({type(exc).__name__})") from exc
        return artifact_digest(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_clinical_model(version: str | int = "champion", device: str = "cpu", expected_sha256: str | None = None):
    """``ClinicalModel`` for a registered version or alias (downloaded once into CXR_HOME/model-cache).

    With ``expected_sha256`` (what the approval signed) the files are hashed as they are read and a
    different digest raises ``models.serving.ArtifactDigestMismatch``: serving never runs weights
    other than the signed ones, whether they were replaced in the artefact store or in the cache.
    Raises ``RegistryError`` when the version/alias does not exist (e.g. no champion yet).
    """
    from models.serving import ArtifactDigestMismatch, ClinicalModel

    settings = get_settings()
    mv = model_version_record(version)
    key = (settings.tracking_uri, model_name(), str(mv.version), device)
    if key in _loaded:
        model = _loaded[key]
        if expected_sha256 is not None and model.artifact_sha256 != expected_sha256:
            raise ArtifactDigestMismatch(Path("memory"), expected_sha256, str(model.artifact_sha256))
        return model
    cache = settings.state_dir / "model-cache" / model_name() / str(mv.version)
    if not cache.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix="dl-", dir=settings.state_dir))
        try:
            _download(str(mv.version), tmp)
            if cache.exists():
                shutil.rmtree(cache)
            cache.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(tmp), str(cache))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    model = ClinicalModel.from_directory(cache, name=model_name(), version=str(mv.version), run_id=mv.run_id,
                                         device=device, expected_sha256=expected_sha256)
    _loaded[key] = model
    return model
