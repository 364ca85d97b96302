"""Small MLflow-registry helpers for the governance layer (read versions, tags, evaluation, aliases).

Reads the store through ``models.registry`` (one client, one notion of the project's store). The
evaluation is read as the exact bytes of the run artefact ``evaluation/evaluation.json``: its SHA-256
is what a signature binds to (§11.70).

Alias moves go through ``move_alias`` so each one is an ``alias.changed`` audit event with from/to
(open-source MLflow keeps no alias history — mlflow #2169).
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from compliance.audit import record_event
from models.registry import EVALUATION_ARTIFACT, client, model_name, model_version_record  # noqa: F401 - model_name: API
from models.registry import RegistryError as ModelRegistryError


class RegistryError(Exception):
    """A version, alias or artefact could not be found or read."""


def resolve_version(version: str | int):
    """A ``ModelVersion`` from ``3``, ``"3"``, ``"v3"`` or an alias such as ``"champion"``."""

    try:
        return model_version_record(version)
    except ModelRegistryError as exc:
        raise RegistryError(str(exc)) from exc


def list_versions() -> list:
    from mlflow.exceptions import MlflowException

    try:
        versions = client().search_model_versions(f"name='{model_name()}'")
    except MlflowException:
        return []
    return sorted(versions, key=lambda mv: int(mv.version))


def aliases_of(name: str | None = None) -> dict[str, str]:
    """alias → version for the registered model ({} when it does not exist yet)."""
    from mlflow.exceptions import MlflowException

    try:
        rm = client().get_registered_model(name or model_name())
    except MlflowException:
        return {}
    return {k: str(v) for k, v in (rm.aliases or {}).items()}


def current_alias(alias: str) -> str | None:
    return aliases_of().get(alias)


def evaluation_bytes(mv) -> bytes:
    if not mv.run_id:
        raise RegistryError(f"version {mv.version} has no training run: no evaluation to check")
    with tempfile.TemporaryDirectory(prefix="cxr-eval-") as tmp:
        try:
            path = client().download_artifacts(mv.run_id, EVALUATION_ARTIFACT, dst_path=tmp)
        except Exception as exc:  # MlflowException or OSError, depending on the store
            raise RegistryError(f"version {mv.version}: run artefact {EVALUATION_ARTIFACT} not found") from exc
        return Path(path).read_bytes()


def load_evaluation(mv) -> tuple[dict[str, Any], str]:
    """(evaluation dict, sha256 of the artefact's bytes)."""
    raw = evaluation_bytes(mv)
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise RegistryError(f"version {mv.version}: {EVALUATION_ARTIFACT} is not valid JSON") from exc
    if not isinstance(data, dict):
        raise RegistryError(f"version {mv.version}: {EVALUATION_ARTIFACT} is not a JSON object")
    return data, hashlib.sha256(raw).hexdigest()


EXTERNAL_DIR = "evaluation/external"


def load_external_evaluations(mv) -> dict[str, tuple[dict[str, Any], str]]:
    """External-validation evaluations logged on the version's run as ``evaluation/external/<dataset>.json``
    → {dataset: (evaluation, sha256)}."""
    if not mv.run_id:
        return {}
    c = client()
    try:
        infos = c.list_artifacts(mv.run_id, EXTERNAL_DIR)
    except Exception:
        return {}
    # evaluation/external/<dataset>.json, or evaluation/external/<dataset>/evaluation.json
    candidates: list[tuple[str, str]] = []
    for info in infos:
        if info.is_dir:
            try:
                inner = c.list_artifacts(mv.run_id, info.path)
            except Exception:
                continue
            candidates += [(Path(info.path).name, i.path) for i in inner
                           if not i.is_dir and Path(i.path).name == "evaluation.json"]
        elif info.path.endswith(".json"):
            candidates.append((Path(info.path).stem, info.path))
    out: dict[str, tuple[dict[str, Any], str]] = {}
    with tempfile.TemporaryDirectory(prefix="cxr-ext-") as tmp:
        for name, path in candidates:
            try:
                raw = Path(c.download_artifacts(mv.run_id, path, dst_path=tmp)).read_bytes()
                data = json.loads(raw)
            except Exception:
                continue
            if isinstance(data, dict):
                out[name] = (data, hashlib.sha256(raw).hexdigest())
    return out


def external_datasets(evaluation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Normalise ``evaluation['external']`` to {dataset name: evaluation-like dict}.

    Accepts a mapping name → evaluation, a list of evaluations carrying ``dataset``/``name``, or a
    single evaluation (has ``covid19_vs_rest``) under ``external``.
    """
    ext = evaluation.get("external")
    if not ext or isinstance(ext, (bool, str, int, float)):  # a flag "this evaluation is external"
        return {}
    if isinstance(ext, list):
        out = {}
        for i, item in enumerate(ext):
            if isinstance(item, dict):
                name = str(item.get("dataset") or item.get("name") or item.get("dataset_name") or f"external-{i + 1}")
                out[name] = item
        return out
    if isinstance(ext, dict):
        if "covid19_vs_rest" in ext:
            return {str(ext.get("dataset") or ext.get("name") or "external"): ext}
        return {str(k): v for k, v in ext.items() if isinstance(v, dict)}
    return {}


def evaluation_view(mv) -> tuple[dict[str, Any], str, dict[str, str]]:
    """(evaluation with ``external`` normalised to {dataset: evaluation}, sha256 of evaluation.json,
    {dataset: sha256} of the separately logged external evaluations).

    External results come from ``evaluation.json['external']`` when it is a mapping/list of
    evaluations, and from the ``evaluation/external/*.json`` run artefacts (these win on a name clash).
    """
    evaluation, sha = load_evaluation(mv)
    view = dict(evaluation)
    external = external_datasets(evaluation)
    ext_shas: dict[str, str] = {}
    for name, (ev, ev_sha) in load_external_evaluations(mv).items():
        external[name] = ev
        ext_shas[name] = ev_sha
    view["external"] = external
    return view, sha, ext_shas


def artifact_digest_of(mv) -> str:
    """Digest of the version's model artefact as the registry holds it now (fresh download)."""
    from models.registry import artifact_sha256

    try:
        return artifact_sha256(mv.version)
    except (ModelRegistryError, OSError, ValueError) as exc:
        raise RegistryError(str(exc)) from exc


def run_params(mv) -> dict[str, str]:
    if not mv.run_id:
        return {}
    try:
        return dict(client().get_run(mv.run_id).data.params)
    except Exception:
        return {}


def set_tags(version: str, tags: dict[str, Any]) -> None:
    c = client()
    for key, value in tags.items():
        c.set_model_version_tag(model_name(), str(version), key, "" if value is None else str(value))


def move_alias(alias: str, to_version: str | None, *, actor: str, role: str, reason: str,
               cause: str, signature_id: str | None = None) -> str | None:
    """Point ``alias`` at ``to_version`` (None removes it); audit ``alias.changed``; return the old version."""
    c = client()
    previous = current_alias(alias)
    if to_version is None:
        if previous is not None:
            c.delete_registered_model_alias(model_name(), alias)
    else:
        c.set_registered_model_alias(model_name(), alias, str(to_version))
    record_event("alias.changed", actor=actor, role=role, subject=f"model/{model_name()}",
                 details={"model": model_name(), "alias": alias, "from_version": previous,
                          "to_version": None if to_version is None else str(to_version), "cause": cause,
                          "reason": reason, "signature_id": signature_id})
    return previous
