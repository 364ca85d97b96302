"""Compliance reports for a period: PDF (tables + charts), CSV, JSON (validated against
``report_schema.json``, which documents every field).

Contents: model lineage per version (dataset version, git commit, parameters, evaluation with CIs,
release-policy result, e-signatures, alias history), prediction volume by model version and site,
outcome-based accuracy, alerts (from the audit trail) and the audit chain's head hash. The export
is itself an audit event (``report.exported``, with the file's SHA-256 and the head hash the report
states), so a report can be matched against the trail later.

Predictions/outcomes are read with plain SQL from the API's ``predictions``/``outcomes`` tables when
they exist (``app.storage``); otherwise the sections say so and count zero.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from compliance.audit import coarse_bounds, in_period, list_events, parse_utc, record_event, verify_chain
from compliance.shortcut_summary import shortcut_differences, shortcut_table
from compliance.users import GovernanceError
from core.db import get_engine

SCHEMA_PATH = Path(__file__).with_name("report_schema.json")
SCHEMA_VERSION = "1.0"
FORMATS = ("pdf", "csv", "json")
METRICS = ("auroc", "sensitivity", "specificity", "ppv", "npv")
ALERT_ACTIONS = {"auth.login_failed", "auth.permission_denied", "model.decision_refused", "model.rolled_back",
                 "model.serving_refused"}
ALERT_PREFIXES = ("alert.", "monitoring.", "drift.")


class ReportError(GovernanceError):
    """The report cannot be built (bad period, schema mismatch, unknown format)."""


def _iso(value: str | date | datetime, *, end: bool = False) -> str:
    """A period bound as an ISO UTC string ``...Z``; a bare date as --to is inclusive (next midnight)."""
    if isinstance(value, datetime):
        dt = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    elif isinstance(value, date):
        d = value + timedelta(days=1) if end else value
        dt = datetime(d.year, d.month, d.day, tzinfo=timezone.utc)
    else:
        text = str(value).strip()
        if len(text) == 10:
            return _iso(date.fromisoformat(text), end=end)
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
        dt = dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if f != f else f


def _ci(d: Any) -> dict[str, float | None]:
    if isinstance(d, dict):
        return {"value": _num(d.get("value")), "ci_low": _num(d.get("ci_low")), "ci_high": _num(d.get("ci_high"))}
    return {"value": _num(d), "ci_low": None, "ci_high": None}


def _int(v: Any) -> int | None:
    n = _num(v)
    return None if n is None else int(n)


# --------------------------------------------------------------------------- gathering
def _evaluation_summary(evaluation: dict[str, Any], sha: str, ext_shas: dict[str, str]) -> dict[str, Any]:
    cvr = evaluation.get("covid19_vs_rest") or {}
    cal = evaluation.get("calibration") or {}
    external = []
    from compliance.policy import split_by_provenance

    all_ext = evaluation.get("external") or {}
    _, not_counted = split_by_provenance(all_ext)
    for name, ev in all_ext.items():
        ecvr = ev.get("covid19_vs_rest") or {}
        external.append({"dataset": name, "n_patients": _int(ev.get("n_patients")), "auroc": _ci(ecvr.get("auroc")),
                         "sensitivity": _ci(ecvr.get("sensitivity")), "sha256": ext_shas.get(name),
                         "counted": name not in not_counted, "not_counted_reason": not_counted.get(name)})
    c19 = cal.get("covid19") if isinstance(cal.get("covid19"), dict) else {}
    calibration = {k: _num(cal.get(k)) for k in ("ece_before", "ece_after", "temperature")}
    calibration.update({"ece_covid19": _ci(c19.get("ece")), "slope_covid19": _ci(c19.get("slope")),
                        "intercept_covid19": _ci(c19.get("intercept"))})
    return {"sha256": sha, "n_patients": _int(evaluation.get("n_patients")), "n_images": _int(evaluation.get("n_images")),
            "threshold": _num(cvr.get("threshold")), "metrics": {m: _ci(cvr.get(m)) for m in METRICS},
            "interval_method": str(evaluation.get("interval_method") or "patient-level percentile bootstrap"),
            "calibration": calibration,
            "external": external,
            "shortcut": {"auroc": {r["name"]: _ci(r["auroc"]) for r in shortcut_table(evaluation)},
                         "differences": {d["name"]: _ci(d) for d in shortcut_differences(evaluation)}}}


def _model_lineage(end: str) -> list[dict[str, Any]]:
    from compliance.approvals import alias_history, signatures, verify_signature
    from compliance.policy import evaluate_policy
    from compliance.registry_access import RegistryError, aliases_of, evaluation_view, list_versions, run_params

    aliases = aliases_of()
    history = alias_history(None, end=end)
    all_sigs = signatures()
    models = []
    for mv in list_versions():
        created = datetime.fromtimestamp((mv.creation_timestamp or 0) / 1000, timezone.utc).isoformat(
            timespec="seconds").replace("+00:00", "Z")
        if parse_utc(created) >= parse_utc(end):
            continue
        v = str(mv.version)
        tags = dict(mv.tags or {})
        try:
            evaluation, sha, ext_shas = evaluation_view(mv)
            ev = _evaluation_summary(evaluation, sha, ext_shas)
            pol = evaluate_policy(evaluation, tags, version=v, evaluation_sha256=sha)
            policy = {"policy_version": pol.policy_version, "passed": pol.passed, "error": None,
                      "criteria": [{"id": c.id, "description": c.description, "metric": c.metric,
                                    "measured": c.measured, "op": c.op, "threshold": c.threshold, "passed": c.passed,
                                    "note": c.note} for c in pol.criteria]}
        except RegistryError as exc:
            from compliance.policy import load_policy

            ev = None
            policy = {"policy_version": str(load_policy()[0]["policy_version"]), "passed": False, "error": str(exc),
                      "criteria": []}
        sigs = []
        for s in all_sigs:
            if s["version"] == v and in_period(s["time_utc"], None, parse_utc(end)):
                sigs.append({**{k: s[k] for k in ("id", "action", "meaning", "signer_name", "signer_full_name",
                                                   "signer_role", "time_utc", "reason", "policy_version",
                                                   "policy_passed", "policy_override_reason", "evaluation_sha256",
                                                   "from_version", "signature_sha256", "audit_seq")},
                             "valid": verify_signature(s)})
        models.append({
            "version": v, "status": tags.get("status", "candidate"),
            "aliases": sorted(a for a, av in aliases.items() if av == v), "created_utc": created, "run_id": mv.run_id,
            "dataset_version": tags.get("dataset_version"), "git_commit": tags.get("git_commit"),
            "trained_by": tags.get("trained_by"), "registered_by": tags.get("registered_by"),
            "parameters": {k: str(val) for k, val in run_params(mv).items()}, "evaluation": ev, "policy": policy,
            "signatures": sigs,
            "alias_history": [h for h in history if v in (h["from_version"], h["to_version"])],
        })
    return models


def _table_columns(table: str) -> set[str] | None:
    from sqlalchemy import inspect

    insp = inspect(get_engine())
    if not insp.has_table(table):
        return None
    return {c["name"] for c in insp.get_columns(table)}


def _predictions(start: str, end: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(prediction volume, outcome-based accuracy) from the API tables, defensively."""
    from sqlalchemy import text

    pcols = _table_columns("predictions")
    need = {"id", "created_at", "model_version", "site", "decision"}
    if pcols is None or not need <= pcols:
        note = "no predictions table in the app database" if pcols is None else \
            f"predictions table lacks columns {sorted(need - pcols)}"
        return ({"available": False, "note": note, "total": 0, "by_model_site": []},
                {"available": False, "note": note, "rows": []})
    # Times are compared parsed, never as strings ("…00.5Z" sorts before "…00Z"): a day-wide SQL
    # prefilter, then the exact [start, end) test in Python.
    s_dt, e_dt = parse_utc(start), parse_utc(end)
    lo, hi = coarse_bounds(s_dt, e_dt)
    with get_engine().connect() as conn:
        prow = conn.execute(text("SELECT model_version, site, created_at FROM predictions WHERE created_at >= :lo "
                                 "AND created_at < :hi"), {"lo": lo, "hi": hi}).all()
        counts = Counter((str(r[0]), str(r[1] or "")) for r in prow if in_period(r[2], s_dt, e_dt))
        volume = {"available": True, "note": "predictions served in the period",
                  "total": int(sum(counts.values())),
                  "by_model_site": [{"model_version": v, "site": site, "n": int(n)}
                                    for (v, site), n in sorted(counts.items())]}
        ocols = _table_columns("outcomes")
        oneed = {"id", "prediction_id", "truth_positive"}
        if ocols is None or not oneed <= ocols:
            return volume, {"available": False, "note": "no usable outcomes table", "rows": []}
        pairs = conn.execute(text(
            "SELECT p.model_version, p.site, p.decision, o.truth_positive, p.created_at FROM predictions p "
            "JOIN outcomes o ON o.prediction_id = p.id "
            "WHERE o.id IN (SELECT MAX(id) FROM outcomes GROUP BY prediction_id) "
            "AND p.created_at >= :lo AND p.created_at < :hi"), {"lo": lo, "hi": hi}).all()
    cells: dict[tuple[str, str], Counter] = {}
    for version, site, decision, truth, created_at in pairs:
        if not in_period(created_at, s_dt, e_dt):
            continue
        c = cells.setdefault((str(version), str(site or "")), Counter())
        positive = str(decision or "").endswith("-positive") or str(decision).lower() == "positive"
        truth = bool(truth)
        c["tp" if positive and truth else "fp" if positive else "fn" if truth else "tn"] += 1
    acc_rows = []
    for (version, site), c in sorted(cells.items()):
        tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
        n = tp + fp + tn + fn
        acc_rows.append({"model_version": version, "site": site, "n_outcomes": n, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
                         "sensitivity": round(tp / (tp + fn), 4) if tp + fn else None,
                         "specificity": round(tn / (tn + fp), 4) if tn + fp else None,
                         "accuracy": round((tp + tn) / n, 4) if n else None})
    return volume, {"available": True, "note": "latest recorded outcome per prediction made in the period",
                    "rows": acc_rows}


def _alert_summary(e: dict[str, Any]) -> str:
    d = e["details"] or {}
    keys = ("reason", "code", "action", "decision", "version", "from_version", "to_version", "failed_criteria", "purpose",
            "alert", "severity")
    parts = [f"{k}={d[k]}" for k in keys if d.get(k) not in (None, "", [])]
    return "; ".join(str(p) for p in parts)[:300]


def _alerts(events: list[dict[str, Any]], chain) -> list[dict[str, Any]]:
    out = []
    if not chain.ok:
        out.append({"seq": chain.first_bad_seq, "time_utc": _now(), "action": "audit.chain_broken", "actor": "system",
                    "subject": "audit_trail", "summary": chain.message})
    for e in events:
        a = e["action"]
        failed_check = a == "policy.checked" and e["details"].get("passed") is False
        if a in ALERT_ACTIONS or a.startswith(ALERT_PREFIXES) or failed_check:
            out.append({"seq": e["seq"], "time_utc": e["time_utc"], "action": a, "actor": e["actor"],
                        "subject": e["subject"], "summary": _alert_summary(e)})
    return out


def _governance_alerts() -> list[dict[str, Any]]:
    from compliance.approvals import governance_inconsistencies

    return [{"seq": None, "time_utc": _now(), "action": "governance.inconsistency", "actor": "system",
             "subject": f"model-version/{f['version']}", "summary": f["problem"]} for f in governance_inconsistencies()]


def build_report(start: str | date | datetime, end: str | date | datetime, *, actor: str = "unknown") -> dict[str, Any]:
    """The report as a dict (what the JSON export writes); nothing is recorded."""
    from compliance.policy import load_policy
    from core.config import get_settings

    s, e = _iso(start), _iso(end, end=True)
    if s >= e:
        raise ReportError(f"empty period: from {s} is not before to {e}")
    chain = verify_chain()
    events = list_events(s, e)
    volume, accuracy = _predictions(s, e)
    return {
        "schema_version": SCHEMA_VERSION,
        "report": {"title": "covid-cxr compliance report", "registered_model": get_settings().registered_model_name,
                   "generated_utc": _now(), "generated_by": actor, "period": {"from": s, "to": e},
                   "policy_version": str(load_policy()[0]["policy_version"])},
        "audit_chain": chain.as_dict(),
        "models": _model_lineage(e),
        "predictions": volume,
        "accuracy": accuracy,
        "alerts": _alerts(events, chain) + _governance_alerts(),
        "audit_summary": {"n_events_in_period": len(events), "by_action": dict(Counter(ev["action"] for ev in events))},
    }


def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def validate_report(report: dict[str, Any]) -> None:
    import jsonschema

    try:
        jsonschema.validate(report, load_schema())
    except jsonschema.ValidationError as exc:
        raise ReportError(f"report does not match its schema at {list(exc.absolute_path)}: {exc.message}") from exc


# --------------------------------------------------------------------------- CSV
CSV_COLUMNS = ("section", "model_version", "site", "key", "value", "ci_low", "ci_high", "detail")


def render_csv(report: dict[str, Any]) -> str:
    """Long format: one fact per row, ``section`` says what it is."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()

    def row(section, key, value="", version="", site="", lo="", hi="", detail=""):
        w.writerow({"section": section, "model_version": version, "site": site, "key": key,
                    "value": "" if value is None else value, "ci_low": "" if lo is None else lo,
                    "ci_high": "" if hi is None else hi, "detail": detail})

    r = report["report"]
    for k in ("title", "registered_model", "generated_utc", "generated_by", "policy_version"):
        row("report", k, r[k])
    row("report", "period_from", r["period"]["from"])
    row("report", "period_to", r["period"]["to"])
    for k, v in report["audit_chain"].items():
        row("audit_chain", k, v)
    for m in report["models"]:
        v = m["version"]
        for k in ("status", "created_utc", "run_id", "dataset_version", "git_commit", "trained_by", "registered_by"):
            row("model", k, m[k], v)
        row("model", "aliases", ",".join(m["aliases"]), v)
        for k, val in sorted(m["parameters"].items()):
            row("parameter", k, val, v)
        ev = m["evaluation"]
        if ev:
            row("evaluation", "sha256", ev["sha256"], v)
            row("evaluation", "n_patients", ev["n_patients"], v)
            row("evaluation", "n_images", ev["n_images"], v)
            row("evaluation", "threshold", ev["threshold"], v)
            for k, mc in ev["metrics"].items():
                row("evaluation", k, mc["value"], v, lo=mc["ci_low"], hi=mc["ci_high"])
            for k, val in ev["calibration"].items():
                row("evaluation", k, val, v)
            for sk, mc in (ev.get("shortcut") or {}).get("auroc", {}).items():
                row("evaluation", f"shortcut.{sk}.auroc", mc["value"], v, lo=mc["ci_low"], hi=mc["ci_high"])
            for sk, mc in (ev.get("shortcut") or {}).get("differences", {}).items():
                row("evaluation", f"shortcut.{sk}", mc["value"], v, lo=mc["ci_low"], hi=mc["ci_high"])
            for x in ev["external"]:
                row("external_validation", "auroc", x["auroc"]["value"], v, lo=x["auroc"]["ci_low"],
                    hi=x["auroc"]["ci_high"], detail=x["dataset"])
        row("policy", "passed", m["policy"]["passed"], v, detail=f"policy {m['policy']['policy_version']}")
        for c in m["policy"]["criteria"]:
            row("policy_criterion", c["id"], c["measured"], v, detail=f"{_threshold_text(c)} -> "
                                                                      f"{'PASS' if c['passed'] else 'FAIL'}")
        for sg in m["signatures"]:
            row("signature", sg["action"], sg["meaning"], v,
                detail=f"{sg['signer_full_name']} ({sg['signer_name']}) {sg['time_utc']}; reason: {sg['reason']}; "
                       f"override: {sg['policy_override_reason'] or '-'}; sha256 {sg['signature_sha256']}; "
                       f"valid {sg['valid']}")
        for h in m["alias_history"]:
            row("alias_history", h["alias"], f"{h['from_version']} -> {h['to_version']}", v,
                detail=f"{h['time_utc']} by {h['actor']} ({h['cause']})")
    for p in report["predictions"]["by_model_site"]:
        row("predictions", "n", p["n"], p["model_version"], p["site"])
    row("predictions", "total", report["predictions"]["total"], detail=report["predictions"].get("note", ""))
    for a in report["accuracy"]["rows"]:
        for k in ("n_outcomes", "tp", "fp", "tn", "fn", "sensitivity", "specificity", "accuracy"):
            row("accuracy", k, a[k], a["model_version"], a["site"])
    for al in report["alerts"]:
        row("alert", al["action"], al["seq"], detail=f"{al['time_utc']} {al['actor']} {al['subject']} {al['summary']}")
    for k, n in sorted(report["audit_summary"]["by_action"].items()):
        row("audit_summary", k, n)
    return buf.getvalue()


# --------------------------------------------------------------------------- PDF
def _fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _threshold_text(c: dict[str, Any]) -> str:
    return c["op"] if c.get("threshold") is None else f"{c['op']} {_fmt(c['threshold'])}"


def _ci_text(m: dict[str, Any]) -> str:
    if m["value"] is None:
        return "-"
    if m["ci_low"] is None:
        return _fmt(m["value"])
    return f"{_fmt(m['value'])} ({_fmt(m['ci_low'])}-{_fmt(m['ci_high'])})"


def pdf_styles():
    from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet

    ss = getSampleStyleSheet()
    return {"h1": ss["Title"], "h2": ss["Heading2"], "h3": ss["Heading3"], "body": ss["BodyText"],
            "small": ParagraphStyle("small", parent=ss["BodyText"], fontSize=7.5, leading=9),
            "mono": ParagraphStyle("mono", parent=ss["BodyText"], fontName="Courier", fontSize=7.5, leading=9)}


def pdf_table(rows: list[list[Any]], widths: list[float] | None = None, st=None):
    """A reportlab Table with wrapped cells, a header row and a grid."""
    from reportlab.lib import colors
    from reportlab.platypus import Paragraph, Table, TableStyle

    st = st or pdf_styles()
    data = [[Paragraph(escape(str(c)), st["small"]) for c in r] for r in rows]
    t = Table(data, colWidths=widths, repeatRows=1)
    t.setStyle(TableStyle([("GRID", (0, 0), (-1, -1), 0.25, colors.grey),
                           ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#dde4ee")),
                           ("VALIGN", (0, 0), (-1, -1), "TOP")]))
    return t


def _bar_chart(title: str, labels: list[str], series: list[list[float]], names: list[str], vmax: float | None = None):
    from reportlab.graphics.charts.barcharts import VerticalBarChart
    from reportlab.graphics.charts.legends import Legend
    from reportlab.graphics.shapes import Drawing, String
    from reportlab.lib import colors

    d = Drawing(460, 190)
    d.add(String(10, 175, title, fontName="Helvetica-Bold", fontSize=10))
    ch = VerticalBarChart()
    ch.x, ch.y, ch.width, ch.height = 40, 30, 300, 130
    ch.data = series
    ch.categoryAxis.categoryNames = labels
    ch.valueAxis.valueMin = 0
    top = max([max(s) for s in series if s] + [1e-9])
    ch.valueAxis.valueMax = vmax if vmax is not None else top * 1.15
    palette = [colors.HexColor("#4a78b0"), colors.HexColor("#9dbbe0"), colors.HexColor("#d9822b")]
    for i in range(len(series)):
        ch.bars[i].fillColor = palette[i % len(palette)]
    d.add(ch)
    lg = Legend()
    lg.x, lg.y = 355, 150
    lg.fontSize = 8
    lg.colorNamePairs = [(palette[i % len(palette)], n) for i, n in enumerate(names)]
    d.add(lg)
    return d


def render_pdf(report: dict[str, Any], out: Path) -> None:
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.units import mm
    from reportlab.platypus import PageBreak, Paragraph, SimpleDocTemplate, Spacer

    st = pdf_styles()
    r, chain = report["report"], report["audit_chain"]
    story: list[Any] = [
        Paragraph(escape(f"Compliance report - {r['registered_model']}"), st["h1"]),
        Paragraph(escape(f"Period {r['period']['from']} to {r['period']['to']} (exclusive). Generated {r['generated_utc']} "
                         f"by {r['generated_by']}. Release policy {r['policy_version']}."), st["body"]),
        Paragraph("Research reference system - not a medical device.", st["small"]),
        Paragraph("Audit trail", st["h2"]),
        Paragraph(escape(f"Chain {'INTACT' if chain['ok'] else 'BROKEN'}: {chain['n_entries']} entries. {chain['message']}."),
                  st["body"]),
        Paragraph("Chain head hash (last entry before this export):", st["body"]),
        Paragraph(chain["head_hash"], st["mono"]),
        Paragraph("Model versions (lineage)", st["h2"]),
    ]
    rows = [["version", "status", "aliases", "dataset version", "git commit", "trained by", "registered by", "policy"]]
    for m in report["models"]:
        rows.append([f"v{m['version']}", m["status"], ",".join(m["aliases"]) or "-", m["dataset_version"] or "-",
                     m["git_commit"] or "-", m["trained_by"] or "-", m["registered_by"] or "-",
                     "PASS" if m["policy"]["passed"] else "FAIL"])
    story.append(pdf_table(rows, st=st) if report["models"] else Paragraph("No registered version.", st["body"]))

    with_eval = [m for m in report["models"] if m["evaluation"]]
    if with_eval:
        labels = [f"v{m['version']}" for m in with_eval]
        au = [m["evaluation"]["metrics"]["auroc"] for m in with_eval]
        se = [m["evaluation"]["metrics"]["sensitivity"] for m in with_eval]
        story += [Spacer(1, 4 * mm), _bar_chart("AUROC and sensitivity (covid19 vs rest): point / lower 95% CI", labels,
                                                [[x["value"] or 0 for x in au], [x["ci_low"] or 0 for x in au],
                                                 [x["ci_low"] or 0 for x in se]],
                                                ["AUROC", "AUROC CI low", "Sens. CI low"], vmax=1.0)]
    for m in report["models"]:
        story += [Paragraph(escape(f"Model {r['registered_model']} version {m['version']} ({m['status']})"), st["h3"]),
                  Paragraph(escape(f"Run {m['run_id']}; created {m['created_utc']}; dataset {m['dataset_version']}; "
                                   f"commit {m['git_commit']}; parameters: "
                                   + (", ".join(f"{k}={v}" for k, v in sorted(m['parameters'].items())) or "-")),
                            st["small"])]
        ev = m["evaluation"]
        if ev:
            story.append(Paragraph(escape(f"Evaluation sha256 {ev['sha256']}; {ev['n_patients']} patients, "
                                          f"{ev['n_images']} images; threshold {_fmt(ev['threshold'])}; ECE after "
                                          f"{_fmt(ev['calibration']['ece_after'])} (T={_fmt(ev['calibration']['temperature'], 2)})"),
                                   st["small"]))
            story.append(Paragraph(escape(f"Interval method: {ev.get('interval_method', '-')}"), st["small"]))
            c19 = ev["calibration"]
            if c19.get("ece_covid19") and c19["ece_covid19"].get("value") is not None:
                story.append(Paragraph(escape(f"P(covid19) calibration: ECE {_ci_text(c19['ece_covid19'])}; slope "
                                              f"{_ci_text(c19.get('slope_covid19') or {})}; intercept "
                                              f"{_ci_text(c19.get('intercept_covid19') or {})}"), st["small"]))
            mrows = [["metric (covid19 vs rest)", "value (95% CI)"]] + [[k, _ci_text(v)] for k, v in ev["metrics"].items()]
            mrows += [[f"external: {x['dataset']} AUROC" + ("" if x.get("counted", True) else " (NOT counted: internal)"),
                       _ci_text(x["auroc"])] for x in ev["external"]]
            sc = ev.get("shortcut") or {}
            mrows += [[f"shortcut: {k} AUROC", _ci_text(v)] for k, v in (sc.get("auroc") or {}).items()]
            mrows += [[f"shortcut: {k}", _ci_text(v)] for k, v in (sc.get("differences") or {}).items()]
            story.append(pdf_table(mrows, [70 * mm, 60 * mm], st))
        else:
            story.append(Paragraph(escape(f"No evaluation: {m['policy'].get('error')}"), st["small"]))
        prow = [["criterion", "measured", "threshold", "result"]] + [
            [c["id"], _fmt(c["measured"]), _threshold_text(c), "PASS" if c["passed"] else "FAIL"]
            for c in m["policy"]["criteria"]]
        story += [Spacer(1, 2 * mm), Paragraph(escape(f"Release policy {m['policy']['policy_version']}: "
                                                      f"{'PASS' if m['policy']['passed'] else 'FAIL'}"), st["small"])]
        if m["policy"]["criteria"]:
            story.append(pdf_table(prow, [60 * mm, 30 * mm, 30 * mm, 20 * mm], st))
        if m["signatures"]:
            srows = [["signed by (printed name)", "UTC time", "meaning", "reason", "override", "valid"]]
            for sg in m["signatures"]:
                srows.append([f"{sg['signer_full_name']} ({sg['signer_name']})", sg["time_utc"], sg["meaning"],
                              sg["reason"], sg["policy_override_reason"] or "-", "yes" if sg["valid"] else "NO"])
            story += [Spacer(1, 2 * mm), pdf_table(srows, [32 * mm, 30 * mm, 32 * mm, 40 * mm, 30 * mm, 12 * mm], st)]
        if m["alias_history"]:
            arows = [["alias", "from", "to", "UTC time", "by", "cause"]] + [
                [h["alias"], h["from_version"] or "-", h["to_version"] or "-", h["time_utc"], h["actor"], h["cause"] or "-"]
                for h in m["alias_history"]]
            story += [Spacer(1, 2 * mm), pdf_table(arows, st=st)]

    story += [PageBreak(), Paragraph("Prediction volume by model version and site", st["h2"])]
    pv = report["predictions"]
    if pv["by_model_site"]:
        story.append(pdf_table([["model version", "site", "predictions"]]
                               + [[p["model_version"], p["site"], p["n"]] for p in pv["by_model_site"]], st=st))
        per_version = Counter()
        for p in pv["by_model_site"]:
            per_version[f"v{p['model_version']}"] += p["n"]
        story.append(_bar_chart("Predictions per model version", list(per_version), [list(per_version.values())],
                                ["predictions"]))
    story.append(Paragraph(escape(f"Total {pv['total']}. {pv.get('note', '')}"), st["small"]))
    story.append(Paragraph("Outcome-based accuracy", st["h2"]))
    ac = report["accuracy"]
    if ac["rows"]:
        story.append(pdf_table([["model", "site", "n", "TP", "FP", "TN", "FN", "sens.", "spec.", "acc."]] + [
            [a["model_version"], a["site"], a["n_outcomes"], a["tp"], a["fp"], a["tn"], a["fn"], _fmt(a["sensitivity"]),
             _fmt(a["specificity"]), _fmt(a["accuracy"])] for a in ac["rows"]], st=st))
    story.append(Paragraph(escape(ac.get("note", "") or "no outcomes"), st["small"]))
    story.append(Paragraph("Alerts", st["h2"]))
    if report["alerts"]:
        story.append(pdf_table([["seq", "UTC time", "event", "actor", "subject", "summary"]] + [
            [a["seq"] if a["seq"] is not None else "-", a["time_utc"], a["action"], a["actor"], a["subject"], a["summary"]]
            for a in report["alerts"]], [10 * mm, 32 * mm, 32 * mm, 20 * mm, 30 * mm, 55 * mm], st))
    else:
        story.append(Paragraph("No alerts in the period.", st["small"]))
    story.append(Paragraph("Audit events in the period", st["h2"]))
    story.append(pdf_table([["event", "count"]] + [[k, n] for k, n in sorted(report["audit_summary"]["by_action"].items())],
                           st=st))

    def footer(canvas, doc):
        canvas.saveState()
        canvas.setFont("Helvetica", 7)
        canvas.drawString(15 * mm, 8 * mm, f"covid-cxr compliance report {r['period']['from']} - {r['period']['to']} | "
                                           f"chain head {chain['head_hash'][:16]}... | page {doc.page}")
        canvas.restoreState()

    doc = SimpleDocTemplate(str(out), pagesize=A4, leftMargin=15 * mm, rightMargin=15 * mm, topMargin=15 * mm,
                            bottomMargin=15 * mm, title="covid-cxr compliance report", author=r["generated_by"])
    doc.build(story, onFirstPage=footer, onLaterPages=footer)


# --------------------------------------------------------------------------- export
def export_report(start: str | date | datetime, end: str | date | datetime, fmt: str, out: Path | str,
                  actor: str | None = None) -> Path:
    """Write the report for [start, end] (a date ``end`` is inclusive) as pdf|csv|json to ``out``;
    audit ``report.exported``. Returns the path written."""
    from compliance.users import get_user
    from core.identity import acting_user

    if fmt not in FORMATS:
        raise ReportError(f"unknown report format {fmt!r}: expected one of {', '.join(FORMATS)}")
    actor = acting_user(actor)
    report = build_report(start, end, actor=actor)
    validate_report(report)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "json":
        out.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    elif fmt == "csv":
        out.write_text(render_csv(report))
    else:
        render_pdf(report, out)
    user = get_user(actor)
    record_event("report.exported", actor=actor, role=user.role if user else "unknown", subject="report",
                 details={"format": fmt, "period": report["report"]["period"],
                          "sha256": hashlib.sha256(out.read_bytes()).hexdigest(), "file_name": out.name,
                          "head_hash": report["audit_chain"]["head_hash"], "chain_ok": report["audit_chain"]["ok"],
                          "n_models": len(report["models"]), "n_predictions": report["predictions"]["total"]})
    return out
