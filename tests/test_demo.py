"""`make demo`'s steps end to end, at a smaller size: every step runs the real `cxr` commands."""
from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_demo_runs_the_whole_lifecycle(tmp_path, monkeypatch):
    import jsonschema

    from app.demo import run_demo
    from compliance.reports import load_schema

    lines: list[str] = []
    monkeypatch.delenv("CXR_USER", raising=False)
    results = run_demo(tmp_path / "demo", patients=40, variant_patients=24, epochs=2, image_size=64,
                       predictions=12, echo=lines.append)
    text = "\n".join(lines)
    # one readable line per step, in lifecycle order
    order = ["synthetic cohort", "imported as dataset", "Kubeflow pipeline ran locally", "release policy",
             "approved by", "hospital API serving", "in-distribution predictions", "PACS", "GET /metrics",
             "new variant batch", "add", "retrained", "compliance report exported", "audit chain verified",
             "API server stopped", "Where everything is"]
    pos = -1
    for marker in order:
        nxt = text.find(marker, pos + 1)
        assert nxt > pos, f"step {marker!r} missing or out of order in:\n{text}"
        pos = nxt
    assert results["first_version"] == "1" and results["challenger_version"] == "2"
    assert results["in_distribution"]["errors"] == 0 and results["variant_on_champion"]["errors"] == 0
    tally = results["in_distribution"]
    assert tally["tp"] + tally["fn"] + tally["tn"] + tally["fp"] == 12, tally  # every prediction sent, counted

    pdf, js = results["reports"]
    report = json.loads(open(js).read())
    jsonschema.validate(report, load_schema())  # compliance/report_schema.json, the exporter's own schema
    assert report["audit_chain"]["ok"] is True and report["audit_chain"]["first_bad_seq"] is None, \
        report["audit_chain"]
    models = {m["version"]: m for m in report["models"]}
    assert set(models) == {"1", "2"}, sorted(models)
    assert "champion" in models["1"]["aliases"] and models["1"]["status"] == "approved", models["1"]
    assert models["2"]["status"] == "candidate" and "champion" not in models["2"]["aliases"], models["2"]
    assert "challenger" in models["2"]["aliases"], models["2"]
    # the PACS step (Orthanc is installed by `make test`): one study modality -> listener -> PACS, whose SR and
    # secondary capture came back into the study
    from app.dicom.orthanc import which

    if which("Orthanc"):
        assert results["pacs"]["instances"] >= 2 and "SR" in results["pacs"]["modalities"], results.get("pacs")
    # both prediction batches (in-distribution and variant, 12 each) and the PACS study are in the report's period
    assert report["predictions"]["total"] == 24 + (1 if results.get("pacs") else 0), report["predictions"]
    from pypdf import PdfReader

    pdf_text = "".join(page.extract_text() or "" for page in PdfReader(pdf).pages)
    assert "covid-cxr" in pdf_text
