"""Model card per registered version (Markdown and PDF), from the registry, the evaluation and the
governance records — never typed by hand, so it cannot drift from what was released.

Sections: model details, intended use, not intended use, data, performance with 95% CIs,
subgroups, calibration, external validation, release policy, limitations (incl. public-dataset
bias), approvals (e-signatures) and alias history.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

SECTIONS = ("Model details", "Intended use", "Not intended use", "Data", "Performance", "Subgroups", "Calibration",
            "External validation", "Release policy", "Limitations", "Approvals", "Alias history")

INTENDED_USE = [
    "Research and education: a reference implementation of the full lifecycle (data, training, governance, "
    "serving, monitoring) of a COVID-19 triage aid from a frontal chest radiograph (PA/AP) plus vital signs.",
    "Output: calibrated probabilities for covid19 / other_pneumonia / normal and a COVID-19 positive/negative flag "
    "at a stated operating threshold, for adult patients, as a second reader that a qualified clinician reviews.",
    "Users: radiologists and emergency physicians in a supervised evaluation setting; data scientists and quality "
    "staff validating the lifecycle.",
]
NOT_INTENDED_USE = [
    "NOT a medical device; not cleared or approved by any regulator. Not for diagnosis, treatment or triage "
    "decisions without an independent clinical reading.",
    "Not a replacement for RT-PCR or antigen testing; a negative output does not rule out COVID-19.",
    "Not for lateral views, CT, paediatric patients (< 18 years), portable/supine studies outside the evaluated "
    "distribution, or image types the input checks refuse.",
    "Not for populations, sites or devices absent from the evaluation without local validation.",
]
LIMITATIONS = [
    "Public-dataset bias: public COVID-19 radiograph collections mix sources, hospitals, devices and countries, "
    "with COVID-19 and control images often from different places. Models trained on them are known to learn "
    "shortcuts (text markers, device, positioning, source hospital) rather than disease; reported performance "
    "can overstate real-world performance.",
    "Selection bias: published cases over-represent severe and atypical presentations; prevalence in the test set "
    "differs from clinical prevalence, so PPV/NPV do not transfer and the threshold should be re-set locally.",
    "Small test sets give wide confidence intervals; subgroups marked small are not interpretable on their own.",
    "Synthetic data used for integration testing does not represent real patients; metrics on it verify the "
    "pipeline, not clinical performance.",
    "Label noise: labels derive from free-text findings, not uniformly from RT-PCR.",
    "Dataset shift after release (new variants, devices, protocols) degrades performance: monitor drift and "
    "outcome-based accuracy, and roll back when alerts fire.",
]


def _ci(d: Any) -> dict[str, float | None]:
    from compliance.reports import _ci as ci

    return ci(d)


def _ci_text(d: Any) -> str:
    from compliance.reports import _ci_text as t

    return t(_ci(d))


def build_model_card(version: str | int) -> dict[str, Any]:
    """Everything the card shows, as a dict (also what ``GET /v1/model`` can embed)."""
    from compliance.approvals import show_model_version
    from compliance.registry_access import model_name

    info = show_model_version(version)
    ev = info.get("evaluation") or {}
    return {"model": model_name(), "version": info["version"], "status": info["status"], "aliases": info["aliases"],
            "created_utc": info["created_utc"], "run_id": info["run_id"], "dataset_version": info["dataset_version"],
            "git_commit": info["git_commit"], "trained_by": info["trained_by"], "registered_by": info["registered_by"],
            "parameters": info.get("parameters", {}), "evaluation": ev, "evaluation_sha256": info.get("evaluation_sha256"),
            "policy": info["policy"], "signatures": info["signatures"], "alias_history": info["alias_history"],
            "intended_use": INTENDED_USE, "not_intended_use": NOT_INTENDED_USE, "limitations": LIMITATIONS}


def _md_escape(x: Any) -> str:
    return str("-" if x is None else x).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in rows])


def _sections(card: dict[str, Any]) -> list[tuple[str, list[str], list[tuple[list[str], list[list[Any]]]]]]:
    """(title, paragraphs, tables) per section: one source for Markdown and PDF."""
    ev = card["evaluation"] or {}
    cvr = ev.get("covid19_vs_rest") or {}
    cal = ev.get("calibration") or {}
    out = []
    out.append(("Model details", [
        f"Registered model {card['model']}, version {card['version']}; status {card['status']}; aliases "
        f"{', '.join(card['aliases']) or 'none'}; created {card['created_utc']}.",
        f"Training run {card['run_id']}; dataset version {card['dataset_version']}; code commit {card['git_commit']}; "
        f"trained by {card['trained_by']}; registered by {card['registered_by']}.",
        "Parameters: " + (", ".join(f"{k}={v}" for k, v in sorted(card["parameters"].items())) or "not recorded") + ".",
    ], []))
    out.append(("Intended use", card["intended_use"], []))
    out.append(("Not intended use", card["not_intended_use"], []))
    counts = ev.get("class_counts") or {}
    out.append(("Data", [
        f"Evaluation on the held-out test split of dataset version {ev.get('dataset_version') or card['dataset_version']}"
        f" (split by patient): {ev.get('n_patients', '-')} patients, {ev.get('n_images', '-')} images"
        + (f"; class counts {', '.join(f'{k}={v}' for k, v in counts.items())}" if counts else "") + ".",
        f"Evaluation artefact sha256 {card['evaluation_sha256'] or '-'}.",
    ] if ev else ["No evaluation artefact is recorded for this version."], []))
    perf_rows = [[m, _ci_text(cvr.get(m))] for m in ("auroc", "sensitivity", "specificity", "ppv", "npv")]
    out.append(("Performance", [
        f"COVID-19 vs rest at operating threshold {cvr.get('threshold', '-')} on P(covid19); point estimate with "
        f"95% confidence interval ({ev.get('interval_method') or 'patient-level bootstrap percentile'}).",
    ], [(["metric", "value (95% CI)"], perf_rows)] if ev else []))
    sg_rows = []
    for attr, groups in (ev.get("subgroups") or {}).items():
        if not isinstance(groups, dict):
            continue
        for value, g in groups.items():
            if not isinstance(g, dict):
                continue
            sg_rows.append([attr, value, g.get("n_images", g.get("n", "-")), g.get("n_patients", "-"),
                            _ci_text(g.get("auroc")), _ci_text(g.get("sensitivity")), _ci_text(g.get("specificity")),
                            g.get("note", "") or ("small group" if g.get("small") else "")])
    out.append(("Subgroups", ["Performance by subgroup (same threshold). Small groups are flagged."] if sg_rows
                else ["No subgroup analysis recorded."],
                [(["attribute", "group", "images", "patients", "AUROC", "sensitivity", "specificity", "note"], sg_rows)]
                if sg_rows else []))
    out.append(("Calibration", [
        f"Temperature scaling T={cal.get('temperature', '-')}; expected calibration error before "
        f"{cal.get('ece_before', '-')}, after {cal.get('ece_after', '-')} (the API returns calibrated probabilities)."
    ] + _covid19_calibration_lines(cal), []))
    from compliance.shortcut_summary import fmt_ci, shortcut_differences, shortcut_table

    sc_rows = [[r["what"], fmt_ci(r["auroc"]), r["n"]["images"], r["n"]["covid19"], r["n"]["other"]]
               for r in shortcut_table(ev)]
    sc_rows += [[d["name"].replace("_", " ") + " (paired AUROC difference)", fmt_ci(d), "", "", ""]
                for d in shortcut_differences(ev)]
    out.append(("Shortcut battery", [
        "Does the model look at the lungs? Ablations on the same split and seeds, the model with the lung fields "
        "blanked or kept alone (fixed lung-field mask, vitals held constant), paired differences; AUROC COVID-19 vs "
        "rest with 95% clustered-DeLong intervals."] if sc_rows else
        ["NO shortcut battery recorded: whether the model uses the source, text or missing fields is unknown."],
        [(["test", "AUROC (95% CI)", "images", "covid19", "other"], sc_rows)] if sc_rows else []))
    from compliance.policy import split_by_provenance

    ext_rows = []
    _, not_counted = split_by_provenance(ev.get("external") or {})
    for name, x in (ev.get("external") or {}).items():
        xc = x.get("covid19_vs_rest") or {}
        ext_rows.append([name, x.get("n_patients", "-"), _ci_text(xc.get("auroc")), _ci_text(xc.get("sensitivity")),
                         _ci_text(xc.get("specificity")),
                         "external (provenance verified)" if name not in not_counted else
                         "NOT external: " + not_counted[name]])
    n_counted = len(ext_rows) - len(not_counted)
    out.append(("External validation",
                ["Performance on other datasets. Only those whose sources, sites and images are disjoint from the "
                 "training data count as external validation."]
                + ([] if n_counted else ["NO provenance-verified external validation: performance outside the "
                                         "development data is unknown."]) if ext_rows
                else ["NO external validation recorded: performance outside the development data is unknown."],
                [(["dataset", "patients", "AUROC", "sensitivity", "specificity", "provenance"], ext_rows)]
                if ext_rows else []))
    pol = card["policy"] or {}
    crit_rows = [[c["id"], c["measured"], c["op"] if c.get("threshold") is None else f"{c['op']} {c['threshold']}",
                  "PASS" if c["passed"] else "FAIL"]
                 for c in pol.get("criteria", [])]
    out.append(("Release policy", [
        f"Release policy {pol.get('policy_version', '-')}: {'PASS' if pol.get('passed') else 'FAIL'}"
        + (f" ({pol['error']})" if pol.get("error") else "") + "."],
        [(["criterion", "measured", "threshold", "result"], crit_rows)] if crit_rows else []))
    out.append(("Limitations", card["limitations"], []))
    sig_rows = [[f"{s['signer_full_name']} ({s['signer_name']})", s["time_utc"], s["meaning"], s["reason"],
                 s["policy_override_reason"] or "-"] for s in card["signatures"]]
    out.append(("Approvals", ["Electronic signatures (21 CFR Part 11): printed name, UTC time, meaning, reason."]
                if sig_rows else ["Not signed: this version has no approval, rejection or retirement decision."],
                [(["signed by", "UTC time", "meaning", "reason", "policy override"], sig_rows)] if sig_rows else []))
    al_rows = [[h["alias"], h["from_version"], h["to_version"], h["time_utc"], h["actor"], h["cause"]]
               for h in card["alias_history"]]
    out.append(("Alias history", [] if al_rows else ["This version never held an alias."],
                [(["alias", "from", "to", "UTC time", "by", "cause"], al_rows)] if al_rows else []))
    return out


def render_markdown(card: dict[str, Any]) -> str:
    lines = [f"# Model card: {card['model']} version {card['version']}", "",
             "> Research reference system - **not a medical device**.", ""]
    for title, paragraphs, tables in _sections(card):
        lines += [f"## {title}", ""]
        bullet = title in ("Intended use", "Not intended use", "Limitations")
        for p in paragraphs:
            lines.append(f"- {p}" if bullet else p)
            if not bullet:
                lines.append("")
        if bullet:
            lines.append("")
        for header, rows in tables:
            lines += _table(header, rows) + [""]
    return "\n".join(lines)


def render_pdf(card: dict[str, Any], out: Path) -> None:
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.units import mm
    from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer

    from compliance.reports import pdf_styles, pdf_table

    st = pdf_styles()
    story: list[Any] = [Paragraph(escape(f"Model card: {card['model']} version {card['version']}"), st["h1"]),
                        Paragraph("Research reference system - not a medical device.", st["small"])]
    for title, paragraphs, tables in _sections(card):
        story.append(Paragraph(escape(title), st["h2"]))
        for p in paragraphs:
            story.append(Paragraph(escape(p), st["body"]))
        for header, rows in tables:
            story += [pdf_table([header] + [["-" if c is None else c for c in r] for r in rows], st=st), Spacer(1, 2 * mm)]
    SimpleDocTemplate(str(out), pagesize=A4, leftMargin=15 * mm, rightMargin=15 * mm, topMargin=15 * mm,
                      bottomMargin=15 * mm, title=f"Model card {card['model']} v{card['version']}").build(story)


def model_card_markdown(version: str | int) -> str:
    return render_markdown(build_model_card(version))


def write_model_card(version: str | int, out: Path | str, fmt: str | None = None) -> Path:
    """Write the card as Markdown (``md``) or PDF (``pdf``; default from the suffix of ``out``)."""
    from compliance.users import UserError

    out = Path(out)
    fmt = (fmt or out.suffix.lstrip(".") or "md").lower()
    if fmt == "markdown":
        fmt = "md"
    if fmt not in ("md", "pdf"):
        raise UserError(f"unknown model-card format {fmt!r}: expected md or pdf")
    card = build_model_card(version)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "md":
        out.write_text(render_markdown(card))
    else:
        render_pdf(card, out)
    return out


def _covid19_calibration_lines(cal: dict) -> list[str]:
    c = cal.get("covid19") if isinstance(cal.get("covid19"), dict) else None
    if not c:
        return []
    return [f"P(covid19): ECE {_ci_text(c.get('ece'))}; calibration slope {_ci_text(c.get('slope'))}; "
            f"calibration-in-the-large intercept {_ci_text(c.get('intercept'))}"
            + (f" ({c['note']})" if c.get("note") else "") + "."]
