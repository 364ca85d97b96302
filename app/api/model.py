"""GET /v1/model: the champion being served, its threshold and a model-card summary."""
from __future__ import annotations

import functools
import json
from typing import Any

from fastapi import APIRouter, Depends, Request

from app.api import problem_doc, service
from app.auth import Principal, require
from app.problems import ApiProblem
from app.schemas import ModelInfo

router = APIRouter(prefix="/v1", tags=["model"])

_CARD_TAGS = ("status", "dataset_version", "git_commit", "trained_by", "registered_by", "approved_by",
              "approved_by_name", "approved_at", "approval_policy_version", "policy_passed")


@functools.lru_cache(maxsize=16)
def _registry_tags(name: str, version: str) -> tuple[tuple[str, str], ...]:
    try:
        from models.registry import client

        mv = client().get_model_version(name, version)
        return tuple(sorted((k, v) for k, v in (mv.tags or {}).items() if k in _CARD_TAGS))
    except Exception:
        return ()


@functools.lru_cache(maxsize=8)
def _governance_card(version: str) -> dict[str, Any] | None:
    """The governance model card (``compliance.model_card``), cached per version; None if unavailable."""
    try:
        from compliance.model_card import build_model_card

        return json.loads(json.dumps(build_model_card(version), default=str))
    except Exception:
        return None


@router.get("/model", response_model=ModelInfo, responses=problem_doc(503))
def get_model(request: Request, principal: Principal = Depends(require("model.read"))) -> ModelInfo:
    lm = service(request).current()
    if lm is None:
        raise ApiProblem(503, "not-ready", "no champion model is loaded yet", headers={"Retry-After": "2"})
    m = lm.model
    config: dict[str, Any] = getattr(m, "config", None) or {}
    training = config.get("training") or {}
    card = {
        "intended_use": "Research and education: triage support for COVID-19 from a frontal chest radiograph "
                        "plus vitals in adults. NOT a medical device; not for clinical decisions.",
        "classes": list(m.classes),
        "decision_rule": f"covid19-positive when calibrated P(covid19) >= {float(m.operating_threshold):.4f}",
        "threshold_selection": config.get("threshold_selection"),
        "training": {k: training.get(k) for k in ("dataset", "dataset_version", "git_commit", "seed", "epochs",
                                                  "encoder", "image_size") if k in training},
        "network": config.get("network"),
        "registry": dict(_registry_tags(lm.name, lm.version)),
        "model_card": _governance_card(lm.version),
        "limitations": ["trained on a small public collection; site and device shift expected",
                        "AP supine films, children and out-of-distribution inputs are flagged as warnings"],
    }
    ood = ((getattr(m, "reference", None) or {}).get("ood") or {}).get("threshold")
    return ModelInfo(name=lm.name, version=lm.version, classes=list(m.classes),
                     operating_threshold=float(m.operating_threshold),
                     temperature=None if getattr(m, "temperature", None) is None else float(m.temperature),
                     image_size=getattr(m, "image_size", None), ood_threshold=None if ood is None else float(ood),
                     loaded_at=lm.loaded_at, card=card)
