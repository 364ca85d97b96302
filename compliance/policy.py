"""Release policy check: the versioned criteria of ``release_policy.yaml`` applied to a version's evaluation.

``check_release_policy(version)`` returns a ``PolicyResult`` with, per criterion, the measured value,
the threshold and pass/fail, and records ``policy.checked`` in the audit trail. A missing metric
fails its criterion (never silently passes).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from compliance.audit import record_event
from compliance.registry_access import RegistryError, evaluation_view, external_datasets, model_name, resolve_version  # noqa: F401 - external_datasets: part of the policy API
from core.config import get_settings
from core.identity import acting_user

_OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b}


class PolicyError(Exception):
    """The policy file is missing or malformed."""


@dataclass
class CriterionResult:
    id: str
    description: str
    metric: str
    op: str
    threshold: Any
    measured: Any
    passed: bool
    note: str = ""


@dataclass
class PolicyResult:
    model: str
    version: str
    policy_version: str
    policy_sha256: str
    passed: bool
    evaluation_sha256: str | None
    criteria: list[CriterionResult] = field(default_factory=list)
    error: str | None = None
    external_sha256: dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> list[CriterionResult]:
        return [c for c in self.criteria if not c.passed]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failed_criteria"] = [c.id for c in self.failed]
        return d


def load_policy(path: Path | str | None = None) -> tuple[dict[str, Any], str]:
    """(policy dict, sha256 of the file)."""
    path = Path(path or get_settings().release_policy_path)
    try:
        raw = path.read_bytes()
        policy = yaml.safe_load(raw)
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyError(f"cannot read release policy {path}: {exc}") from exc
    if not isinstance(policy, dict) or not policy.get("policy_version") or not isinstance(policy.get("criteria"), list):
        raise PolicyError(f"release policy {path} needs 'policy_version' and a list of 'criteria'")
    for c in policy["criteria"]:
        if not isinstance(c, dict) or "id" not in c or c.get("kind") not in ("metric", "external", "tags"):
            raise PolicyError(f"release policy {path}: malformed criterion {c!r}")
        if c["kind"] != "tags" and (c.get("op") not in _OPS or not isinstance(c.get("threshold"), (int, float))):
            raise PolicyError(f"release policy {path}: criterion {c['id']} needs op (>=, <=, >, <) and a numeric threshold")
    return policy, hashlib.sha256(raw).hexdigest()


def get_path(data: Any, dotted: str) -> Any:
    """Value at a dotted path; a ``{value, ci_low, ci_high}`` leaf given without a sub-key yields ``value``."""
    cur = data
    for part in dotted.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            return None
    if isinstance(cur, dict) and "value" in cur:
        cur = cur["value"]
    return cur


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _evaluate_criterion(c: dict[str, Any], evaluation: dict[str, Any], tags: dict[str, str]) -> CriterionResult:
    kind, op, thr = c["kind"], c.get("op", ""), c.get("threshold")
    desc = c.get("description", c["id"])
    if kind == "tags":
        wanted = list(c.get("tags") or [])
        missing = [t for t in wanted if not str(tags.get(t, "")).strip()]
        return CriterionResult(c["id"], desc, "tags:" + ",".join(wanted), "present", None,
                               "all present" if not missing else "missing: " + ", ".join(missing), not missing)
    if kind == "metric":
        measured = _number(get_path(evaluation, c["metric"]))
        if measured is None:
            return CriterionResult(c["id"], desc, c["metric"], op, thr, None, False, "metric missing in evaluation")
        return CriterionResult(c["id"], desc, c["metric"], op, thr, round(measured, 6), bool(_OPS[op](measured, thr)))
    # external
    datasets = external_datasets(evaluation)
    need = int(c.get("min_datasets", 1))
    values = {name: _number(get_path(ev, c["metric"])) for name, ev in datasets.items()}
    if len(datasets) < need:
        return CriterionResult(c["id"], desc, "external." + c["metric"], op, thr, None, False,
                               f"{len(datasets)} external dataset(s); at least {need} required")
    bad = [n for n, v in values.items() if v is None or not _OPS[op](v, thr)]
    known = [v for v in values.values() if v is not None]
    worst = (min(known) if op.startswith(">") else max(known)) if known else None
    note = "; ".join(f"{n}={'missing' if v is None else round(v, 4)}" for n, v in values.items())
    return CriterionResult(c["id"], desc, "external." + c["metric"], op, thr,
                           None if worst is None else round(worst, 6), not bad, note)


def evaluate_policy(evaluation: dict[str, Any], tags: dict[str, str], *, version: str = "",
                    evaluation_sha256: str | None = None, policy_path: Path | str | None = None) -> PolicyResult:
    """Pure evaluation of the policy (no MLflow, no audit): used by the check and by reports."""
    policy, policy_sha = load_policy(policy_path)
    results = [_evaluate_criterion(c, evaluation, tags) for c in policy["criteria"]]
    return PolicyResult(model_name(), str(version), str(policy["policy_version"]), policy_sha,
                        all(r.passed for r in results), evaluation_sha256, results)


def check_release_policy(version: str | int, *, actor: str | None = None, record: bool = True,
                         policy_path: Path | str | None = None) -> PolicyResult:
    """Check a registered version against the release policy; audit ``policy.checked`` when ``record``.

    A version whose evaluation cannot be read fails the policy (with ``error`` set); an unknown
    version raises ``RegistryError``.
    """
    mv = resolve_version(version)
    tags = dict(mv.tags or {})
    try:
        evaluation, sha, ext_shas = evaluation_view(mv)
        result = evaluate_policy(evaluation, tags, version=mv.version, evaluation_sha256=sha, policy_path=policy_path)
        result.external_sha256 = ext_shas
    except RegistryError as exc:
        policy, policy_sha = load_policy(policy_path)
        result = PolicyResult(model_name(), str(mv.version), str(policy["policy_version"]), policy_sha, False, None,
                              [], error=str(exc))
    if record:
        who = acting_user(actor)
        from compliance.users import get_user

        user = get_user(who)
        record_event("policy.checked", actor=who, role=user.role if user else "unknown",
                     subject=f"model/{model_name()}/{mv.version}",
                     details={"model": model_name(), "version": str(mv.version), "policy_version": result.policy_version,
                              "policy_sha256": result.policy_sha256, "passed": result.passed,
                              "evaluation_sha256": result.evaluation_sha256,
                              "external_sha256": result.external_sha256,
                              "failed_criteria": [c.id for c in result.failed], "error": result.error,
                              "measured": {c.id: c.measured for c in result.criteria}})
    return result
