"""Request and response models of the hospital API (pydantic), separate from the storage tables."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CLASSES = ("covid19", "other_pneumonia", "normal")
ClassName = Literal["covid19", "other_pneumonia", "normal"]
SITE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,47}$"


class Problem(BaseModel):
    """RFC 9457 problem details (``application/problem+json``)."""

    model_config = ConfigDict(extra="allow")
    type: str
    title: str
    status: int
    detail: str
    code: str
    instance: str | None = None


class InputWarning(BaseModel):
    code: str = Field(description="short kebab-case id, e.g. ap-supine, vitals-missing, age-under-18, "
                                  "low-image-quality, out-of-distribution")
    message: str


class ModelRef(BaseModel):
    name: str
    version: str


class OutcomeIn(BaseModel):
    """A confirmed diagnosis for a prediction. At least one of the two fields."""

    model_config = ConfigDict(extra="forbid")
    confirmed_class: ClassName | None = Field(None, description="final diagnosis class")
    rtpcr_result: Literal["positive", "negative"] | None = Field(None, description="SARS-CoV-2 RT-PCR result")
    correction: "CorrectionIn | None" = Field(
        None, description="needed to replace an outcome already recorded: an e-signature by the caller")

    @model_validator(mode="after")
    def _one_of(self) -> "OutcomeIn":
        if self.confirmed_class is None and self.rtpcr_result is None:
            raise ValueError("give confirmed_class and/or rtpcr_result")
        return self


class CorrectionIn(BaseModel):
    """Signed correction (21 CFR 11.200): the caller re-enters their password and gives a reason."""

    model_config = ConfigDict(extra="forbid")
    password: str = Field(min_length=1, max_length=256, description="the caller's own password (re-authentication)")
    reason: str = Field(min_length=5, max_length=1000, description="why the recorded outcome is corrected (no PHI)")


OutcomeIn.model_rebuild()


class OutcomeOut(BaseModel):
    id: int
    prediction_id: str
    confirmed_class: str | None
    rtpcr_result: str | None
    truth_positive: bool
    recorded_by: str
    recorded_at: str
    supersedes_id: int | None = None
    signed_by: str | None = None
    signature_meaning: str | None = None


class PredictionOut(BaseModel):
    id: str = Field(description="prediction id (uuid4)")
    created_at: str
    model: ModelRef = Field(description="the model version that produced this prediction")
    site: str
    probabilities: dict[str, float] = Field(description="temperature-calibrated class probabilities")
    p_covid19: float
    operating_threshold: float
    decision: Literal["covid19-positive", "covid19-negative"]
    ood_score: float | None = None
    warnings: list[InputWarning]
    vitals_present: dict[str, bool] = Field(description="which vitals were given (values are not stored)")
    view: str | None = None
    deployment_prevalence: float | None = Field(None, description="the site's configured deployment prevalence "
                                                "(CXR_SITE_PREVALENCE), when set")
    p_covid19_at_site_prevalence: float | None = Field(
        None, description="P(covid19) corrected from the development prevalence to the site's (Bayes odds, label "
                          "shift); informative only: the decision stays on the validated p_covid19 and threshold")
    outcome: OutcomeOut | None = None
    disclaimer: str = "Research software, not a medical device: not for clinical decisions."


class ModelInfo(BaseModel):
    name: str
    version: str
    classes: list[str]
    operating_threshold: float
    temperature: float | None = None
    image_size: int | None = None
    ood_threshold: float | None = None
    loaded_at: float
    card: dict[str, Any]


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    ready: bool
    model_version: str | None = None


class SignatureProblem(BaseModel):
    signature_id: str | None = None
    audit_seq: int | None = None
    problem: str


class AuditVerification(BaseModel):
    """``ok`` only when the chain, the checkpoints, the prediction/outcome rows and every e-signature
    verify (the same checks as ``cxr audit verify``)."""
    ok: bool
    n_entries: int
    head_hash: str
    first_bad_seq: int | None = None
    message: str
    status: Literal["intact", "broken", "unverifiable"] = "intact"
    mode: str = "keyed"
    chain_ok: bool = True
    problems: list[str] = Field(default_factory=list)
    checkpoint: dict[str, Any] | None = None
    rows: dict[str, int] = Field(default_factory=dict)
    signature_problems: list[SignatureProblem] = Field(default_factory=list)
