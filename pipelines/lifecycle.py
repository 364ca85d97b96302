"""Training and evaluation as lifecycle steps: the model library's runs, with their audit trail.

``models.train.train`` and ``models.validation.evaluate_model_version`` record nothing themselves;
they hand each lifecycle event (``training.started``, ``model.registered``, ``model.evaluated``,
``training.finished``) to an event sink. Here that sink is the audit trail, attributed to the acting
user and the role the user store gives them. Every entry point (``cxr train``, ``cxr evaluate``,
the Kubeflow pipeline's steps, ``cxr reproduce``) goes through these two functions.
"""
from __future__ import annotations

import json
from typing import Any

from compliance.audit import record_event
from core.identity import acting_user
from models.events import EventSink


def actor_role(actor: str) -> str:
    """The acting user's role from the user store (``unknown`` for an unregistered OS user)."""
    try:
        from compliance.users import get_user

        user = get_user(actor)
        return user.role if user else "unknown"
    except Exception:  # noqa: BLE001 - the users table is optional for a pipeline run
        return "unknown"


class AuditSink:
    """An event sink that appends each event to the audit trail as ``actor`` with ``role``.

    A plain picklable object (not a closure): distributed training hands it to every rank's process;
    only rank 0 reports events.
    """

    def __init__(self, actor: str, role: str) -> None:
        self.actor, self.role = actor, role

    def __call__(self, action: str, subject: str, details: dict) -> None:
        # details pass through JSON so numpy scalars and paths are stored as plain values
        record_event(action, actor=self.actor, role=self.role, subject=subject,
                     details=json.loads(json.dumps(details, default=_plain)))


def audit_sink(actor: str, role: str | None = None) -> EventSink:
    """The audit trail as an event sink for ``actor`` (role looked up once in the user store)."""
    return AuditSink(actor, role or actor_role(actor))


def _plain(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.integer):
            return int(o)
        if isinstance(o, np.floating):
            return float(o)
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def train_and_record(dataset_name: str, *, actor: str | None = None, nproc: int = 1, **train_kwargs: Any) -> dict:
    """``models.train.train`` with its lifecycle events written to the audit trail; ``nproc > 1``: the same
    on that many local processes (DDP, ``models.launch.launch``; rank 0 reports the events)."""
    actor = acting_user(actor)
    sink = audit_sink(actor)
    if nproc > 1:
        from models.launch import launch

        return launch(nproc, dataset_name, actor=actor, on_event=sink, **train_kwargs)
    from models.train import train

    return train(dataset_name, actor=actor, on_event=sink, **train_kwargs)


def evaluate_and_record(model_version: str | int, dataset_name: str, *, actor: str | None = None,
                        **evaluate_kwargs: Any) -> dict:
    """``models.validation.evaluate_model_version`` with ``model.evaluated`` written to the audit trail."""
    from models.validation import evaluate_model_version

    actor = acting_user(actor)
    return evaluate_model_version(model_version, dataset_name, on_event=audit_sink(actor), **evaluate_kwargs)
