"""FHIR output: a prediction as a FHIR **R4** DiagnosticReport with contained Observations.

Validated with ``fhir.resources.R4B`` (fhir.resources 8 defaults to R5; its ``R4B`` sub-package is
FHIR 4.3, whose DiagnosticReport/Observation/Device structures used here are the R4 (4.0.1) ones).
Contained: a ``Device`` naming the model and version that produced the result, one Observation for
P(covid19), one per class probability and one for the decision at the operating threshold. No
patient data: ``subject`` is omitted (the caller links the report to its own order by the
prediction id in ``identifier``; the accession number is never echoed).
"""
from __future__ import annotations

from typing import Any

SYSTEM = "https://covid-cxr.example.org/fhir/CodeSystem/cxr-ai"
ID_SYSTEM = "https://covid-cxr.example.org/fhir/prediction-id"
UCUM = "http://unitsofmeasure.org"
LOINC = "http://loinc.org"
FHIR_JSON = "application/fhir+json"


def _prob(id_: str, code: str, display: str, value: float, effective: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation", "id": id_, "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "imaging", "display": "Imaging"}]}],
        "code": {"coding": [{"system": SYSTEM, "code": code, "display": display}], "text": display},
        "effectiveDateTime": effective,
        "valueQuantity": {"value": round(float(value), 6), "unit": "probability", "system": UCUM, "code": "1"},
        "device": {"reference": "#model"},
    }


def diagnostic_report(pred: dict[str, Any]) -> dict[str, Any]:
    """Build and validate the DiagnosticReport for a stored prediction (``PredictionRow.as_dict()``)."""
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    eff = pred["created_at"]
    model = pred["model"]
    contained: list[dict[str, Any]] = [{
        "resourceType": "Device", "id": "model",
        "deviceName": [{"name": model["name"], "type": "model-name"}],
        "version": [{"value": str(model["version"])}],
        "note": [{"text": "Research software, not a medical device: not for clinical decisions."}],
    }]
    contained.append(_prob("p-covid19", "p-covid19", "Probability of COVID-19 (calibrated)", pred["p_covid19"], eff))
    for cls, p in sorted(pred["probabilities"].items()):
        contained.append(_prob(f"prob-{cls.replace('_', '-')}", f"probability-{cls}",
                               f"Probability of class {cls} (calibrated)", p, eff))
    positive = pred["decision"] == "covid19-positive"
    decision_obs = {
        "resourceType": "Observation", "id": "decision", "status": "final",
        "code": {"coding": [{"system": SYSTEM, "code": "covid19-decision",
                             "display": "COVID-19 decision at the model's operating threshold"}]},
        "effectiveDateTime": eff,
        "valueCodeableConcept": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                        "code": "POS" if positive else "NEG",
                        "display": "Positive" if positive else "Negative"}],
            "text": pred["decision"]},
        "method": {"text": f"P(covid19) >= {pred['operating_threshold']:.4f}"},
        "device": {"reference": "#model"},
        "note": [{"text": f"{w['code']}: {w['message']}"} for w in pred.get("warnings", [])] or None,
    }
    if decision_obs["note"] is None:
        del decision_obs["note"]
    contained.append(decision_obs)
    results = [{"reference": f"#{c['id']}"} for c in contained if c["resourceType"] == "Observation"]
    warn_text = "; ".join(w["code"] for w in pred.get("warnings", []))
    report = {
        "resourceType": "DiagnosticReport",
        "id": pred["id"],
        "identifier": [{"system": ID_SYSTEM, "value": pred["id"]}],
        "status": "preliminary",  # machine output awaiting clinical review
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD",
                                  "display": "Radiology"}]}],
        "code": {"coding": [{"system": LOINC, "code": "36554-4", "display": "XR Chest Single view"},
                            {"system": SYSTEM, "code": "covid19-cxr-vitals-assessment",
                             "display": "AI COVID-19 assessment from chest radiograph and vitals"}],
                 "text": "AI COVID-19 assessment from chest radiograph and vitals"},
        "effectiveDateTime": eff,
        "issued": eff,
        "contained": contained,
        "result": results,
        "conclusion": (f"{pred['decision']} (P(covid19) = {pred['p_covid19']:.3f}; model {model['name']} "
                       f"v{model['version']})" + (f"; warnings: {warn_text}" if warn_text else "")),
    }
    validated = DiagnosticReport.model_validate(report)
    return validated.model_dump(mode="json", by_alias=True, exclude_none=True)
