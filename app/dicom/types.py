"""The narrow interface between the DICOM integration and whatever produces predictions.

The listener, :func:`app.dicom.pipeline.handle_instances` (the STOW-RS route reuses it) and the
benchmark call one function::

    analyse(data: bytes, accession: str | None) -> AnalysisResult | Refusal

``data`` is one complete DICOM Part 10 file exactly as it was received; ``accession`` is its
AccessionNumber (None when absent), passed so the caller can look up the patient's vitals
(``PUT /v1/vitals/{accession}``). The callable owns the input gate (``models.preprocessing``), the
model, the prediction record and the ``prediction.served`` audit event; it returns a
:class:`Refusal` for an instance the input gate refuses (it never raises for bad input). Anything
it raises is a *processing error* (a bug or an outage): the instance is kept, not lost.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Union

import numpy as np

DISCLAIMER = ("RESEARCH SOFTWARE - NOT FOR DIAGNOSTIC USE. Not a medical device; "
              "the result must not be used for clinical decisions.")


@dataclass(frozen=True)
class Approval:
    """Who approved the model version that produced the result, and when (UTC ISO 8601)."""

    approved_by: str | None = None
    approved_at: str | None = None

    def describe(self) -> str:
        if not self.approved_by and not self.approved_at:
            return "approval not recorded"
        return f"approved by {self.approved_by or 'unknown'} at {self.approved_at or 'unknown time'}"


@dataclass
class AnalysisResult:
    """One analysed radiograph.

    ``heatmap`` (Grad-CAM for covid19) and ``image`` (the prepared radiograph the model saw) are
    float32 (H, W) in [0, 1]; the heatmap is resized to the image when their shapes differ.
    ``warnings`` are ``{"code", "message"}`` dicts as the API returns them.
    """

    prediction_id: str
    p_covid19: float
    probabilities: dict[str, float]
    decision: str  # "covid19-positive" | "covid19-negative"
    operating_threshold: float
    model_name: str
    model_version: str
    image: np.ndarray
    heatmap: np.ndarray
    warnings: list[dict[str, str]] = field(default_factory=list)
    approval: Approval | None = None

    @property
    def positive(self) -> bool:
        return self.decision.endswith("positive")


@dataclass(frozen=True)
class Refusal:
    """The input gate refused the instance: ``code`` (``models.preprocessing.ImageRefused.code``,
    e.g. ``wrong-modality``) and ``reason`` (what was found and what was expected; no patient data)."""

    code: str
    reason: str


Analyse = Callable[[bytes, Union[str, None]], Union[AnalysisResult, Refusal]]
