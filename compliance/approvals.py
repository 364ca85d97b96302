"""Human release decisions with electronic signatures (21 CFR Part 11 §11.50, §11.70, §11.200).

Every decision (approve, reject, rollback, retire) is signed: the signer re-enters their password
at each signing (§11.200(a)), and the signature manifestation — printed name, UTC date/time,
meaning, reason — plus the policy version, the SHA-256 of the evaluation it was based on and, for
approvals and roll-backs, the SHA-256 of the model artefact itself (``artifact_sha256``: the
canonical digest over the files of the packaged model — weights, preprocessing configuration,
calibration — computed from a fresh download of the registry's copy) is stored three times, linked to each other:

1. a row in ``e_signatures`` (with the audit sequence number and entry hash of its audit event),
2. the audit event itself (``model.approved`` …; part of the hash chain, so it cannot be edited
   unnoticed),
3. MLflow version tags (``approval_*``), so the registry shows who released what.

``signature_sha256`` is the SHA-256 over the canonical signature record: it binds the
manifestation to the model version and evaluation (§11.70) and can be recomputed from any copy.

Rules: only the ``approver`` role signs; an approver never signs a version they trained or
registered (separation of duties); approval needs the release policy to pass, or an explicit
override with a reason (recorded as an override); the alias ``champion`` moves only here, and
each move is an ``alias.changed`` audit event with from/to.

Serving trusts none of MLflow's state: ``serving_approval(version)`` is what the API asks before it
publishes a version — a valid, unrevoked approve/rollback signature (its audit entry's MAC
recomputes with the audit key) that carries an artefact digest, and the newest governed move of
``champion`` naming that version. The API then loads the artefact only if its files hash to that digest.
"""
from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select

from compliance.audit import canonical_json, list_events, record_event, verify_entry
from compliance.policy import check_release_policy, evaluate_policy
from compliance.registry_access import (
    RegistryError,
    aliases_of,
    artifact_digest_of,
    current_alias,
    evaluation_view,
    list_versions,
    load_evaluation,
    model_name,
    move_alias,
    resolve_version,
    run_params,
    set_tags,
)
from compliance.users import (
    GovernanceError,
    PermissionDenied,
    User,
    authenticate_password,
    require_role,
)
from core.db import get_engine, session_scope
from core.schema import ESignature

CHAMPION = "champion"
APPROVER_ROLES = ("approver",)
MEANINGS = {
    "approve": "approved for clinical use",
    "reject": "rejected for clinical use",
    "rollback": "restored as the version in clinical use (roll-back)",
    "retire": "retired from clinical use",
}
MIN_REASON_LENGTH = 5


class ApprovalRefused(GovernanceError):
    """A release decision was refused (policy, status, separation of duties, missing reason)."""




_SIGNED_FIELDS = ("id", "model", "version", "action", "meaning", "signer_name", "signer_full_name", "signer_role",
                  "time_utc", "reason", "policy_version", "policy_passed", "policy_override_reason",
                  "evaluation_sha256", "from_version")


def signature_hash(record: dict[str, Any]) -> str:
    signed = {k: record.get(k) for k in _SIGNED_FIELDS}
    if record.get("artifact_sha256") is not None:  # signatures made before it existed hash as they did
        signed["artifact_sha256"] = record["artifact_sha256"]
    return hashlib.sha256(canonical_json(signed).encode()).hexdigest()


def _ensure_tables() -> None:
    # The engine may have been created before this module was imported: create our table if needed.
    ESignature.__table__.create(get_engine(), checkfirst=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _subject(version: str) -> str:
    return f"model/{model_name()}/{version}"


def _check_reason(reason: str | None, what: str = "reason") -> str:
    reason = (reason or "").strip()
    if len(reason) < MIN_REASON_LENGTH:
        raise ApprovalRefused(f"a {what} is required (at least {MIN_REASON_LENGTH} characters)")
    return reason


def _refuse(version: str, actor: User, decision: str, code: str, message: str, **details: Any) -> None:
    record_event("model.decision_refused", actor=actor.name, role=actor.role, subject=_subject(version),
                 details={"model": model_name(), "version": version, "decision": decision, "code": code, **details})
    raise ApprovalRefused(message)


def _authenticate_signer(name: str, password: str, decision: str, version: str) -> User:
    """Re-authentication at signing (§11.200) then the role check; both failures are audited."""
    if not name:
        raise ApprovalRefused("the signer is unknown: give --as USER (or set CXR_USER)")
    authenticate_password(name, password, purpose=f"e-signature:{decision}")
    return require_role(name, APPROVER_ROLES, action=f"model.{decision}", subject=_subject(version))


def _separation_of_duties(mv, signer: User, decision: str) -> None:
    tags = mv.tags or {}
    people = {k: (tags.get(k) or "").strip() for k in ("trained_by", "registered_by")}
    missing = [k for k, v in people.items() if not v]
    if missing:
        _refuse(mv.version, signer, decision, "lineage-missing",
                f"version {mv.version} lacks tag(s) {', '.join(missing)}: separation of duties cannot be verified")
    involved = [k for k, v in people.items() if v.lower() == signer.name.lower()]
    if involved:
        record_event("auth.permission_denied", actor=signer.name, role=signer.role, subject=_subject(mv.version),
                     details={"action": f"model.{decision}", "reason": "separation-of-duties",
                              "conflict": involved, "version": mv.version})
        raise PermissionDenied(f"separation of duties: {signer.name!r} {' and '.join(involved).replace('_by', '')} "
                               f"version {mv.version} and may not sign its {decision}")


def _sign(decision: str, version: str, signer: User, reason: str, *, audit_action: str,
          policy_version: str | None = None, policy_passed: bool | None = None,
          override_reason: str | None = None, evaluation_sha256: str | None = None,
          from_version: str | None = None, extra: dict[str, Any] | None = None,
          artifact_sha256: str | None = None) -> dict[str, Any]:
    _ensure_tables()
    record = {
        "id": str(uuid.uuid4()), "model": model_name(), "version": str(version), "action": decision,
        "meaning": MEANINGS[decision], "signer_name": signer.name, "signer_full_name": signer.full_name,
        "signer_role": signer.role, "time_utc": _now(), "reason": reason, "policy_version": policy_version,
        "policy_passed": policy_passed, "policy_override_reason": override_reason,
        "evaluation_sha256": evaluation_sha256, "from_version": from_version, "artifact_sha256": artifact_sha256,
    }
    record["signature_sha256"] = signature_hash(record)
    entry = record_event(audit_action, actor=signer.name, role=signer.role, subject=_subject(str(version)),
                         details={"model": model_name(), "version": str(version), "e_signature": record,
                                  "policy_override": override_reason is not None, **(extra or {})})
    record["audit_seq"], record["audit_entry_hash"] = entry["seq"], entry["entry_hash"]
    with session_scope() as s:
        s.add(ESignature(**record))
    return record


def _artifact_digest(mv, signer: User, decision: str) -> str:
    """The digest the signature binds to, from a fresh download of the registry's artefact."""
    try:
        return artifact_digest_of(mv)
    except RegistryError as exc:
        _refuse(str(mv.version), signer, decision, "no-artifact",
                f"version {mv.version}: {exc}; a release cannot be signed without the model artefact's digest")
        raise  # unreachable


def _status(mv) -> str:
    return (mv.tags or {}).get("status", "candidate") or "candidate"


# --------------------------------------------------------------------------- decisions
def approve_model_version(version: str | int, *, approver: str, password: str, reason: str,
                          override_policy_reason: str | None = None) -> dict[str, Any]:
    """Sign the approval of a candidate version and make it the champion.

    Raises ``AuthenticationError`` (wrong password), ``PermissionDenied`` (not an approver, or
    separation of duties), ``ApprovalRefused`` (not a candidate, policy fails without override,
    no reason), ``RegistryError`` (unknown version).
    """
    mv = resolve_version(version)
    v = str(mv.version)
    signer = _authenticate_signer(approver, password, "approve", v)
    reason = _check_reason(reason)
    if _status(mv) != "candidate":
        _refuse(v, signer, "approve", "not-candidate",
                f"version {v} has status {_status(mv)!r}: only candidate versions can be approved")
    _separation_of_duties(mv, signer, "approve")

    policy = check_release_policy(v, actor=signer.name)
    override = None
    if not policy.passed:
        failed = [c.id for c in policy.failed] or ["evaluation-unreadable"]
        if policy.error:
            _refuse(v, signer, "approve", "no-evaluation",
                    f"version {v}: {policy.error}; an approval cannot be signed without an evaluation")
        if override_policy_reason is None:
            _refuse(v, signer, "approve", "policy-failed",
                    f"version {v} fails release policy {policy.policy_version} ({', '.join(failed)}); "
                    f"approval refused (an override needs --override-policy REASON)", failed_criteria=failed)
        override = _check_reason(override_policy_reason, "policy-override reason")

    digest = _artifact_digest(mv, signer, "approve")
    previous = current_alias(CHAMPION)
    sig = _sign("approve", v, signer, reason, audit_action="model.approved", policy_version=policy.policy_version,
                policy_passed=policy.passed, override_reason=override, evaluation_sha256=policy.evaluation_sha256,
                from_version=previous, artifact_sha256=digest,
                extra={"failed_criteria": [c.id for c in policy.failed], "previous_champion": previous,
                       "external_sha256": policy.external_sha256})
    set_tags(v, {
        "status": "approved", "approved_by": signer.name, "approved_by_name": signer.full_name,
        "approved_at": sig["time_utc"], "approval_meaning": sig["meaning"], "approval_reason": reason,
        "approval_policy_version": policy.policy_version, "approval_evaluation_sha256": policy.evaluation_sha256,
        "approval_artifact_sha256": digest,
        "approval_signature_id": sig["id"], "approval_signature_sha256": sig["signature_sha256"],
        "policy_passed": str(policy.passed).lower(), "policy_override": str(override is not None).lower(),
        "policy_override_reason": override or "",
    })
    move_alias(CHAMPION, v, actor=signer.name, role=signer.role, reason=reason, cause="model.approved",
               signature_id=sig["id"])
    return {"version": v, "previous_champion": previous, "signature": sig, "policy": policy.as_dict(),
            "override": override is not None}


def reject_model_version(version: str | int, *, approver: str, password: str, reason: str) -> dict[str, Any]:
    """Sign the rejection of a candidate version (status → rejected)."""
    mv = resolve_version(version)
    v = str(mv.version)
    signer = _authenticate_signer(approver, password, "reject", v)
    reason = _check_reason(reason)
    if _status(mv) != "candidate":
        _refuse(v, signer, "reject", "not-candidate",
                f"version {v} has status {_status(mv)!r}: only candidate versions can be rejected "
                f"(use rollback or retire for an approved version)")
    try:
        _, eval_sha = load_evaluation(mv)
    except RegistryError:
        eval_sha = None
    sig = _sign("reject", v, signer, reason, audit_action="model.rejected", evaluation_sha256=eval_sha)
    set_tags(v, {"status": "rejected", "rejected_by": signer.name, "rejected_by_name": signer.full_name,
                 "rejected_at": sig["time_utc"], "rejection_reason": reason, "rejection_signature_id": sig["id"]})
    return {"version": v, "signature": sig}


def _previous_approved(current: str) -> str | None:
    """The version that held ``champion`` before ``current`` and is still approved (alias history),
    else the highest approved version other than ``current``."""
    statuses = {str(mv.version): _status(mv) for mv in list_versions()}
    history = [e["details"].get("to_version") for e in list_events(action="alias.changed")
               if e["details"].get("alias") == CHAMPION]
    for v in reversed(history):
        if v and v != current and statuses.get(v) == "approved":
            return v
    approved = sorted((int(v) for v, st in statuses.items() if st == "approved" and v != current), reverse=True)
    return str(approved[0]) if approved else None


def rollback_champion(*, approver: str, password: str, reason: str) -> dict[str, Any]:
    """Signed roll-back: ``champion`` goes back to the previously approved version; the withdrawn
    version is retired (so a second roll-back never returns to it)."""
    current = current_alias(CHAMPION)
    subject_v = current or "none"
    signer = _authenticate_signer(approver, password, "rollback", subject_v)
    reason = _check_reason(reason)
    if current is None:
        _refuse(subject_v, signer, "rollback", "no-champion", "there is no champion to roll back")
    target = _previous_approved(current)
    if target is None:
        _refuse(current, signer, "rollback", "no-previous-approved",
                f"no previously approved version to roll back to from champion {current}")
    target_mv = resolve_version(target)
    _separation_of_duties(target_mv, signer, "rollback")
    try:
        _, eval_sha = load_evaluation(target_mv)
    except RegistryError:
        eval_sha = None
    digest = _artifact_digest(target_mv, signer, "rollback")
    sig = _sign("rollback", target, signer, reason, audit_action="model.rolled_back", evaluation_sha256=eval_sha,
                from_version=current, extra={"from_version": current, "to_version": target},
                artifact_sha256=digest)
    set_tags(current, {"status": "retired", "retired_by": signer.name, "retired_at": sig["time_utc"],
                       "retired_reason": f"rolled back: {reason}", "retirement_signature_id": sig["id"]})
    set_tags(target, {"restored_by": signer.name, "restored_at": sig["time_utc"], "restore_signature_id": sig["id"]})
    move_alias(CHAMPION, target, actor=signer.name, role=signer.role, reason=reason, cause="model.rolled_back",
               signature_id=sig["id"])
    return {"from_version": current, "to_version": target, "signature": sig}


def retire_model_version(version: str | int, *, approver: str, password: str, reason: str) -> dict[str, Any]:
    """Signed retirement of a version that is not the champion (roll back first if it is)."""
    mv = resolve_version(version)
    v = str(mv.version)
    signer = _authenticate_signer(approver, password, "retire", v)
    reason = _check_reason(reason)
    if current_alias(CHAMPION) == v:
        _refuse(v, signer, "retire", "is-champion",
                f"version {v} is the champion: roll back (cxr model rollback) before retiring it")
    if _status(mv) == "retired":
        _refuse(v, signer, "retire", "already-retired", f"version {v} is already retired")
    sig = _sign("retire", v, signer, reason, audit_action="model.retired",
                extra={"previous_status": _status(mv)})
    set_tags(v, {"status": "retired", "retired_by": signer.name, "retired_at": sig["time_utc"],
                 "retired_reason": reason, "retirement_signature_id": sig["id"]})
    return {"version": v, "signature": sig}


# --------------------------------------------------------------------------- reading
def signatures(version: str | int | None = None) -> list[dict[str, Any]]:
    _ensure_tables()
    with session_scope() as s:
        q = select(ESignature).order_by(ESignature.time_utc, ESignature.audit_seq)
        if version is not None:
            q = q.where(ESignature.version == str(version))
        return [r.as_dict() for r in s.execute(q).scalars().all()]


def verify_signature(record: dict[str, Any], *, strict: bool = False) -> bool:
    """The stored signature hash matches the record, and the linked audit entry carries the same record.
    ``strict``: also the entry's own MAC recomputes with the audit key (a DB-only writer cannot forge it)."""
    if signature_hash(record) != record.get("signature_sha256"):
        return False
    entry = _entry(record.get("audit_seq"))
    if entry is None or entry["entry_hash"] != record.get("audit_entry_hash"):
        return False
    signed = entry["details"].get("e_signature", {})
    if signed.get("signature_sha256") != record.get("signature_sha256"):
        return False
    return not strict or verify_entry(entry["seq"])[0]


def _entry(seq: Any) -> dict[str, Any] | None:
    from compliance.audit import get_entry

    return get_entry(seq) if isinstance(seq, int) else None


@dataclass
class ServingApproval:
    """What the API may publish: ``ok`` with the signed ``artifact_sha256``, else ``reason`` (short code)."""
    ok: bool
    version: str
    reason: str
    message: str
    artifact_sha256: str | None = None
    signature_id: str | None = None


_GRANTS = ("approve", "rollback")


def serving_approval(version: str | int) -> ServingApproval:
    """May ``version`` be served as champion? Needs, from the app database and the audit trail only
    (never MLflow tags or aliases, which anyone with registry access can set):

    1. an approve or roll-back-to signature for it that is the newest release decision about it (a later
       retire, reject or roll-back away from it revokes it) — else ``no-approval`` / ``revoked``;
    2. that signature verifies, including its audit entry's MAC — else ``signature-invalid``;
    3. it signs an artefact digest — else ``no-artifact-digest`` (approved before approvals signed it);
    4. the newest governed move of ``champion`` (``alias.changed``, MAC verified) is to this version —
       else ``alias-not-governed`` (the alias was moved in MLflow directly).
    The caller then checks the artefact's files against ``artifact_sha256``.
    """
    v = str(version)
    decisions = []
    for s in signatures():
        if s["version"] == v or (s["action"] == "rollback" and s.get("from_version") == v):
            decisions.append(s)
    decisions.sort(key=lambda s: s["audit_seq"] or 0)
    grants = [s for s in decisions if s["version"] == v and s["action"] in _GRANTS]
    digest = grants[-1].get("artifact_sha256") if grants else None
    if not grants:
        return ServingApproval(False, v, "no-approval", f"version {v} has no approval signature")
    last = decisions[-1]
    if not (last["version"] == v and last["action"] in _GRANTS):
        return ServingApproval(False, v, "revoked", f"version {v}'s approval was revoked ({last['action']} signed "
                               f"{last['time_utc']})", digest, last["id"])
    sig = grants[-1]
    if not verify_signature(sig, strict=True):
        return ServingApproval(False, v, "signature-invalid", f"version {v}'s approval signature {sig['id']} does not "
                               f"verify against the audit trail", digest, sig["id"])
    if not digest:
        return ServingApproval(False, v, "no-artifact-digest", f"version {v}'s approval {sig['id']} signs no model "
                               f"artefact digest (signed before serving verification): re-approve it", None, sig["id"])
    moves = [e for e in list_events(action="alias.changed") if e["details"].get("alias") == CHAMPION]
    if not moves or moves[-1]["details"].get("to_version") != v or not verify_entry(moves[-1]["seq"])[0]:
        recorded = moves[-1]["details"].get("to_version") if moves else None
        return ServingApproval(False, v, "alias-not-governed", f"alias champion points to {v} but governance last moved "
                               f"it to {recorded!r} (moved outside cxr model approve/rollback)", digest, sig["id"])
    return ServingApproval(True, v, "", f"version {v} approved by signature {sig['id']}", digest, sig["id"])


SIGNING_ACTIONS = ("model.approved", "model.rejected", "model.rolled_back", "model.retired")


def verify_signatures() -> list[dict[str, Any]]:
    """Cross-check the e-signature table against the audit trail: every row's hash recomputes and
    matches its audit entry, and every signing audit entry still has its row. Returns the problems
    (empty when all signatures verify), each {signature_id, audit_seq, problem}."""
    problems: list[dict[str, Any]] = []
    rows = signatures()
    events = {e["seq"]: e for e in list_events() if e["action"] in SIGNING_ACTIONS}
    by_id = {r["id"]: r for r in rows}
    for r in rows:
        if signature_hash(r) != r["signature_sha256"]:
            problems.append({"signature_id": r["id"], "audit_seq": r["audit_seq"],
                             "problem": "e-signature record was altered (its hash does not recompute)"})
            continue
        e = events.get(r["audit_seq"])
        if e is None or e["entry_hash"] != r["audit_entry_hash"] or \
                (e["details"].get("e_signature") or {}).get("signature_sha256") != r["signature_sha256"]:
            problems.append({"signature_id": r["id"], "audit_seq": r["audit_seq"],
                             "problem": "e-signature does not match its audit entry"})
    for seq, e in events.items():
        sig = e["details"].get("e_signature") or {}
        if sig.get("id") and sig["id"] not in by_id:
            problems.append({"signature_id": sig["id"], "audit_seq": seq,
                             "problem": "e-signature row missing (deleted) for this audit entry"})
    return problems


def alias_history(alias: str | None = CHAMPION, start: str | None = None, end: str | None = None) -> list[dict[str, Any]]:
    out = []
    for e in list_events(start, end, action="alias.changed"):
        d = e["details"]
        if alias is None or d.get("alias") == alias:
            out.append({"seq": e["seq"], "time_utc": e["time_utc"], "actor": e["actor"], "alias": d.get("alias"),
                        "from_version": d.get("from_version"), "to_version": d.get("to_version"),
                        "cause": d.get("cause"), "reason": d.get("reason")})
    return out


def _summary(mv, aliases: dict[str, str]) -> dict[str, Any]:
    tags = dict(mv.tags or {})
    return {
        "version": str(mv.version), "status": _status(mv),
        "aliases": sorted(a for a, v in aliases.items() if v == str(mv.version)),
        "created_utc": datetime.fromtimestamp((mv.creation_timestamp or 0) / 1000, timezone.utc)
        .isoformat(timespec="seconds").replace("+00:00", "Z"),
        "run_id": mv.run_id, "dataset_version": tags.get("dataset_version"), "git_commit": tags.get("git_commit"),
        "trained_by": tags.get("trained_by"), "registered_by": tags.get("registered_by"),
        "approved_by": tags.get("approved_by"),
    }


def list_model_versions() -> list[dict[str, Any]]:
    aliases = aliases_of()
    return [_summary(mv, aliases) for mv in list_versions()]


def show_model_version(version: str | int) -> dict[str, Any]:
    """Status, tags, lineage, parameters, evaluation, policy result (not audited), signatures, alias history."""
    mv = resolve_version(version)
    info = _summary(mv, aliases_of())
    info["tags"] = dict(mv.tags or {})
    info["source"] = mv.source
    info["parameters"] = run_params(mv)
    try:
        evaluation, sha, ext_shas = evaluation_view(mv)
        info["evaluation"], info["evaluation_sha256"], info["external_sha256"] = evaluation, sha, ext_shas
        policy = evaluate_policy(evaluation, info["tags"], version=info["version"], evaluation_sha256=sha)
        policy.external_sha256 = ext_shas
        info["policy"] = policy.as_dict()
    except RegistryError as exc:
        info["evaluation"], info["evaluation_sha256"], info["external_sha256"] = None, None, {}
        info["policy"] = {"passed": False, "error": str(exc), "criteria": [], "failed_criteria": []}
    info["signatures"] = signatures(info["version"])
    info["alias_history"] = [h for h in alias_history(None)
                             if info["version"] in (h["from_version"], h["to_version"])]
    return info


def governance_inconsistencies() -> list[dict[str, Any]]:
    """Registry state that did not come through this module (MLflow has no access control, so an
    alias or tag can be changed behind governance's back): each finding is {version, problem}.

    * the ``champion`` alias differs from the last ``alias.changed`` in the audit trail;
    * the champion has no valid approve/rollback signature;
    * a version tagged ``approved`` has no approve signature.
    """
    findings: list[dict[str, Any]] = []
    champion = current_alias(CHAMPION)
    history = alias_history(CHAMPION)
    recorded = history[-1]["to_version"] if history else None
    if champion != recorded:
        findings.append({"version": champion, "problem": f"alias champion is {champion!r} in MLflow but the audit "
                                                         f"trail last moved it to {recorded!r} (moved outside governance)"})
    sigs = signatures()
    if champion is not None:
        ok = [s for s in sigs if s["version"] == champion and s["action"] in ("approve", "rollback")]
        if not ok:
            findings.append({"version": champion, "problem": "champion has no approval signature"})
        elif not any(verify_signature(s) for s in ok):
            findings.append({"version": champion, "problem": "champion's approval signature does not verify"})
    approved_signed = {s["version"] for s in sigs if s["action"] == "approve"}
    for mv in list_versions():
        if _status(mv) == "approved" and str(mv.version) not in approved_signed:
            findings.append({"version": str(mv.version), "problem": "status tag 'approved' without an approval signature"})
    return findings
