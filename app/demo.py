"""``cxr demo``: the whole lifecycle, one readable line per step, on embedded defaults.

synthetic cohort → import + DVC version → Kubeflow pipeline run locally (train, evaluate,
register) → release-policy check → e-signed approval → API serving the champion → predictions
and confirmed outcomes from several sites → Prometheus metrics (and a real Prometheus if one is
installed) → variant batch → retrain → challenger vs champion → compliance report (PDF + JSON)
→ audit-chain verification → server stopped → summary.

Every step runs the real ``cxr`` command (the same contracts integrators and tests rely on) in an
isolated workspace: state in ``<CXR_HOME>/demo`` and a throw-away git + DVC project root inside
it, so the demo never changes the repository's own ``data/``.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import typer

DEMO_PASSWORD = "demo-password-not-for-production"
# the synthetic cohort's sites (pipelines/synth.py): the demo clinician works for all of them
DEMO_SITES = ("synthetic-site-a", "synthetic-site-b", "synthetic-site-c", "synthetic-site-d")
DEMO_USERS = [  # name, role, printed name
    ("demo-admin", "admin", "Demo Administrator"),
    ("demo-researcher", "researcher", "Dr. Demo Researcher"),
    ("demo-approver", "approver", "Dr. Demo Approver"),
    ("demo-clinician", "clinician", "Dr. Demo Clinician"),
    ("demo-compliance", "compliance_officer", "Demo Compliance Officer"),
]


class DemoFailed(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Demo:
    def __init__(self, workdir: Path, *, patients: int, variant_patients: int, epochs: int,
                 image_size: int, encoder: str, predictions: int, echo=typer.echo):
        self.workdir = workdir
        self.project = workdir / "project"
        self.home = workdir / "home"
        self.patients = patients
        self.variant_patients = variant_patients
        self.epochs = epochs
        self.image_size = image_size
        self.encoder = encoder
        self.n_predictions = predictions
        self.echo = echo
        self.cxr = str(Path(sys.executable).parent / "cxr")
        self.env = dict(os.environ, CXR_HOME=str(self.home), CXR_PROJECT_ROOT=str(self.project),
                        MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
        self.env.pop("MLFLOW_TRACKING_URI", None)
        self.env.pop("CXR_DATABASE_URL", None)
        self.tokens: dict[str, str] = {}
        self.server: subprocess.Popen | None = None
        self.prometheus: subprocess.Popen | None = None
        self.listener: subprocess.Popen | None = None
        self.pacs_server = None
        self.results: dict = {}
        self.step_no = 0

    # -- helpers -------------------------------------------------------------------------
    def step(self, text: str) -> None:
        self.step_no += 1
        self.echo(f"[{self.step_no:2d}] {text}")

    def run(self, *args: str, stdin: str | None = None, user: str | None = None, check: bool = True) -> str:
        """``cxr ARGS``; ``user``: act as that demo user, authenticated by their personal token (CXR_TOKEN)."""
        env = dict(self.env)
        env.pop("CXR_USER", None)
        env.pop("CXR_TOKEN", None)
        if user:
            env["CXR_USER"] = user
            if user in self.tokens:
                env["CXR_TOKEN"] = self.tokens[user]
        proc = subprocess.run([self.cxr, *args], input=stdin, capture_output=True, text=True, env=env,
                              cwd=self.workdir, timeout=1800)
        log = self.workdir / "logs" / f"{self.step_no:02d}-{args[0]}-{args[1] if len(args) > 1 else ''}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as fh:
            fh.write(f"$ cxr {' '.join(args)}\n{proc.stdout}\n{proc.stderr}\n")
        if check and proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
            raise DemoFailed(f"`cxr {' '.join(args)}` exited {proc.returncode}:\n" + "\n".join(tail))
        return proc.stdout

    def commit_data(self, message: str) -> None:
        """Commit the DVC pointer files, as a researcher would: the dataset version gets a git commit."""
        subprocess.run(["git", "add", "-A"], cwd=self.project, check=True, capture_output=True)
        subprocess.run(["git", "commit", "-q", "-m", message, "--allow-empty"], cwd=self.project, check=True,
                       capture_output=True)

    def run_json(self, *args: str, user: str | None = None, check: bool = True) -> dict:
        out = self.run(*args, user=user, check=check)
        start = out.find("{")
        if start < 0:
            raise DemoFailed(f"`cxr {' '.join(args)}` printed no JSON")
        return json.loads(out[start:])

    # -- the lifecycle ---------------------------------------------------------------------
    def prepare(self) -> None:
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        self.project.mkdir(parents=True)
        self.home.mkdir(parents=True)
        subprocess.run(["git", "init", "-q"], cwd=self.project, check=True)
        subprocess.run(["git", "config", "user.email", "demo@covid-cxr.local"], cwd=self.project, check=True)
        subprocess.run(["git", "config", "user.name", "covid-cxr demo"], cwd=self.project, check=True)
        self.step(f"workspace {self.workdir} (state: CXR_HOME={self.home}; data: git + DVC project {self.project})")

    def users(self) -> None:
        admin, role, full = DEMO_USERS[0]
        # bootstrap: the first user (an admin) needs no credentials; everything after authenticates
        self.run("users", "add", admin, "--role", role, "--full-name", full, "--new-password-stdin",
                 stdin=DEMO_PASSWORD + "\n")
        self.tokens[admin] = self.run("tokens", "issue", "--user", admin, "--as", admin, "--password-stdin",
                                      stdin=DEMO_PASSWORD + "\n").strip().splitlines()[-1]
        for name, role, full in DEMO_USERS[1:]:
            sites = [a for site in DEMO_SITES for a in ("--site", site)] if role == "clinician" else []
            self.run("users", "add", name, "--role", role, "--full-name", full, *sites, "--new-password-stdin",
                     stdin=DEMO_PASSWORD + "\n", user=admin)
            self.tokens[name] = self.run("tokens", "issue", "--user", name, user=admin).strip().splitlines()[-1]
        self.step("users created with roles admin, researcher, approver, clinician (sites "
                  f"{', '.join(DEMO_SITES)}), compliance_officer; personal API tokens issued")

    def cohort(self) -> None:
        cohort = self.workdir / "cohort"
        self.run("data", "synth", "--patients", str(self.patients), "--out", str(cohort), "--seed", "7",
                 "--image-size", "256")
        n = sum(1 for _ in cohort.glob("*.dcm"))
        self.step(f"synthetic cohort: {self.patients} patients, {n} DICOM files + vitals.csv in {cohort}")
        summary = self.run_json("data", "import", str(cohort), "--name", "demo", "--json", user="demo-researcher")
        self.results["import"] = summary
        self.commit_data("dataset demo: first version")
        versions = self.run("data", "versions")
        self.step(f"imported as dataset 'demo': {summary.get('n_accepted', '?')} accepted, "
                  f"{summary.get('n_rejected', '?')} rejected (with reasons); DVC-versioned and pushed")
        self.results["versions"] = versions.strip()
        external = self.workdir / "external-cohort"
        self.run("data", "synth", "--patients", str(max(20, self.patients // 2)), "--out", str(external),
                 "--seed", "9", "--image-size", "256")
        ext = self.run_json("data", "import", str(external), "--name", "demo-external", "--json",
                            user="demo-researcher")
        self.commit_data("dataset demo-external")
        self.step(f"second cohort imported as 'demo-external': {ext.get('n_accepted', '?')} images, never trained on; "
                  f"it comes from the same four synthetic sites, so provenance marks it internal: it is evaluated "
                  f"but does not count as external validation")

    def pipeline(self, tag: str) -> dict:
        state = self.run_json("pipeline", "run", "--local", "--dataset", "demo", "--external", "demo-external",
                              "--epochs", str(self.epochs),
                              "--image-size", str(self.image_size), "--encoder", self.encoder, "--json",
                              user="demo-researcher")
        return state

    def train_and_release(self) -> None:
        state = self.pipeline("first")
        version = str(state.get("model_version") or state.get("challenger_version") or state.get("version"))
        self.results["first_version"] = version
        ev = (state.get("evaluation_summary") or {}).get("demo:test") or {}
        auroc = (ev.get("auroc") or {}).get("value")
        self.step(f"Kubeflow pipeline ran locally (validate → train → evaluate → compare → register): "
                  f"candidate covid-cxr v{version}" + (f", test AUROC {auroc:.3f}" if auroc is not None else ""))
        check = self.run_json("model", "check", version, "--json", check=False)  # exit 1 = policy fails
        passed = bool(check.get("passed"))
        failed = [c.get("id", "?") for c in check.get("criteria", []) if not c.get("passed")]
        self.step(f"release policy {check.get('policy_version', '')} check for v{version}: "
                  + ("all criteria pass" if passed else "FAILS " + ", ".join(failed)))
        args = ["model", "approve", version, "--reason", "Demo release: policy criteria reviewed", "--as",
                "demo-approver", "--password-stdin"]
        if not passed:
            env = {k: v for k, v in self.env.items() if k not in ("CXR_USER", "CXR_TOKEN")}
            refused = subprocess.run([self.cxr, *args], input=DEMO_PASSWORD + "\n", capture_output=True, text=True,
                                     env=env, cwd=self.workdir, timeout=600)
            if refused.returncode == 0:
                raise DemoFailed("a policy-failing version was approved without an override")
            self.step(f"approval of v{version} without an override: refused (policy fails), as the policy requires")
            args += ["--override-policy", "DEMO ONLY: tiny synthetic cohort cannot meet the clinical policy"]
        self.run(*args, stdin=DEMO_PASSWORD + "\n")
        self.step(f"v{version} approved by 'Dr. Demo Approver' (e-signed, re-authenticated) → alias champion"
                  + ("" if passed else " (policy override recorded as such)"))

    def start_api(self) -> None:
        self.port = _free_port()
        log = (self.workdir / "logs" / "api.log").open("w")
        self.server = subprocess.Popen([self.cxr, "serve", "--port", str(self.port), "--log-level", "warning"],
                                       env=self.env, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        import httpx

        deadline = time.time() + 300
        while time.time() < deadline:
            if self.server.poll() is not None:
                raise DemoFailed(f"API exited with {self.server.returncode}; see {log.name}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise DemoFailed("API did not become ready in 300 s")
        self.api = f"http://127.0.0.1:{self.port}"
        self.step(f"hospital API serving the champion at {self.api} (OpenAPI: {self.api}/docs)")

    def predictions(self, cohort: Path, count: int, label: str) -> dict:
        import httpx

        rows = list(csv.DictReader((cohort / "vitals.csv").open()))[:count]
        headers = {"Authorization": f"Bearer {self.tokens['demo-clinician']}"}
        tally = {"tp": 0, "fn": 0, "tn": 0, "fp": 0, "errors": 0}
        vital_keys = ["temperature_c", "spo2_percent", "heart_rate_bpm", "respiratory_rate", "systolic_bp_mmhg",
                      "age_years"]
        with httpx.Client(base_url=self.api, headers=headers, timeout=120) as client:
            for row in rows:
                vitals = {k: float(row[k]) for k in vital_keys if row.get(k) not in (None, "")}
                if row.get("sex"):
                    vitals["sex"] = row["sex"]
                with (cohort / row["filename"]).open("rb") as fh:
                    r = client.post("/v1/predictions", files={"image": (row["filename"], fh, "application/dicom")},
                                    data={"vitals": json.dumps(vitals), "site": row["site"]})
                if r.status_code != 200:
                    tally["errors"] += 1
                    continue
                pred = r.json()
                truth = row["label"] == "covid19"
                positive = pred["decision"] == "covid19-positive"
                tally[("tp" if positive else "fn") if truth else ("fp" if positive else "tn")] += 1
                o = client.post(f"/v1/predictions/{pred['id']}/outcome",
                                json={"confirmed_class": row["label"],
                                      "rtpcr_result": "positive" if truth else "negative"})
                if o.status_code not in (200, 201):
                    tally["errors"] += 1
        sens = tally["tp"] / max(1, tally["tp"] + tally["fn"])
        spec = tally["tn"] / max(1, tally["tn"] + tally["fp"])
        self.step(f"{len(rows)} {label} predictions from {len({r['site'] for r in rows})} sites with confirmed "
                  f"outcomes: sensitivity {sens:.2f}, specificity {spec:.2f}, {tally['errors']} errors")
        return {**tally, "sensitivity": sens, "specificity": spec}

    def pacs(self, cohort: Path) -> None:
        """One study modality → listener → PACS: Orthanc as the PACS, the DICOM listener between them.

        The modality is pynetdicom's C-STORE (what a CR/DX unit does); vitals for the study's accession
        number go to the API first (``PUT /v1/vitals``), as a bedside system would send them.
        """
        from app.dicom.orthanc import Orthanc, free_port, which

        if which("Orthanc") is None:
            self.step("PACS step skipped: Orthanc is not installed (apt-get install orthanc dcmtk; `make test` "
                      "installs them)")
            return
        import httpx
        import pydicom
        from pydicom.uid import generate_uid
        from pynetdicom import AE

        orthanc = Orthanc(self.workdir / "pacs", name="cxr-demo-pacs").start()
        self.pacs_server = orthanc
        port = free_port()
        row = next(csv.DictReader((cohort / "vitals.csv").open()))
        log = (self.workdir / "logs" / "dicom-listener.log").open("w")
        self.listener = subprocess.Popen(
            [self.cxr, "dicom", "listen", "--host", "127.0.0.1", "--port", str(port), "--ae-title", "CXR-AI",
             "--send-to", orthanc.destination, "--spool", str(self.workdir / "dicom-spool")],
            env={**self.env, "CXR_DICOM_SITE": row["site"]}, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        ds = pydicom.dcmread(cohort / row["filename"])
        ds.StudyInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.AccessionNumber = "DEMO-ACC-0001"
        vital_keys = ["temperature_c", "spo2_percent", "heart_rate_bpm", "respiratory_rate", "systolic_bp_mmhg",
                      "age_years"]
        vitals = {k: float(row[k]) for k in vital_keys if row.get(k) not in (None, "")}
        r = httpx.put(f"{self.api}/v1/vitals/DEMO-ACC-0001", json=vitals, timeout=30,
                      headers={"Authorization": f"Bearer {self.tokens['demo-clinician']}"})
        if r.status_code != 200:
            raise DemoFailed(f"PUT /v1/vitals answered {r.status_code}: {r.text[:300]}")
        ae = AE(ae_title="DEMO-CR")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        deadline = time.time() + 120
        assoc = None
        while time.time() < deadline:  # the listener loads the champion before it listens
            if self.listener.poll() is not None:
                raise DemoFailed(f"DICOM listener exited with {self.listener.returncode}; see {log.name}")
            assoc = ae.associate("127.0.0.1", port, ae_title="CXR-AI")
            if assoc.is_established:
                break
            time.sleep(1)
        if assoc is None or not assoc.is_established:
            raise DemoFailed("the DICOM listener did not accept an association in 120 s")
        status = assoc.send_c_store(ds)
        assoc.release()
        if not status or status.Status != 0:
            raise DemoFailed(f"C-STORE to the listener failed: {status}")
        # the source image is not in the PACS (the modality sent it to the listener only): SR + SC
        study = orthanc.wait_for(str(ds.StudyInstanceUID), lambda xs: len(xs) >= 2, timeout=120)
        kinds = sorted({str(x.get("Modality")) for x in study})
        if len(study) < 2:
            raise DemoFailed(f"results did not reach the PACS within 120 s (study holds {kinds})")
        self.results["pacs"] = {"orthanc": orthanc.url, "study_instance_uid": str(ds.StudyInstanceUID),
                                "instances": len(study), "modalities": kinds}
        self.step(f"PACS round trip: modality C-STORE → `cxr dicom listen` → Orthanc received the SR + secondary "
                  f"capture in the source study ({', '.join(kinds)}); look at it in Orthanc Explorer "
                  f"{orthanc.url}/app/explorer.html while the demo runs, or `dsrdump` the SR")

    def metrics(self) -> None:
        import httpx

        text = httpx.get(f"{self.api}/metrics", timeout=30).text
        lines = [ln for ln in text.splitlines() if ln.startswith(("cxr_outcomes_total", "cxr_predictions_total"))]
        (self.workdir / "metrics.txt").write_text(text)
        self.step(f"GET /metrics: {len(lines)} prediction/outcome series (full scrape in {self.workdir / 'metrics.txt'})")
        prom = shutil.which("prometheus")
        if not prom:
            self.step("Prometheus not installed here: skipped the live scrape (apt-get install prometheus)")
            return
        repo = Path(__file__).resolve().parent.parent
        port = _free_port()
        cfg = self.workdir / "prometheus.yml"
        rules = sorted(str(p) for p in (repo / "prometheus" / "rules").glob("*.yml"))
        cfg.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": rules,
            "scrape_configs": [{"job_name": "cxr-api", "static_configs": [{"targets": [f"127.0.0.1:{self.port}"]}]}],
        }))
        self.prometheus = subprocess.Popen(
            [prom, f"--config.file={cfg}", f"--storage.tsdb.path={self.workdir / 'prometheus-data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 30
        value = None
        while time.time() < deadline and value is None:
            time.sleep(1)
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": "sum(cxr_outcomes_total)"},
                              timeout=5).json()
                if r.get("data", {}).get("result"):
                    value = r["data"]["result"][0]["value"][1]
            except (httpx.HTTPError, ValueError):
                pass
        self.results["prometheus_url"] = f"http://127.0.0.1:{port}"
        self.step(f"real Prometheus scraped the API: sum(cxr_outcomes_total) = {value} (alert rules loaded)")

    def variant(self) -> None:
        vcohort = self.workdir / "variant-cohort"
        self.run("data", "synth", "--patients", str(self.variant_patients), "--out", str(vcohort), "--seed", "8",
                 "--variant", "omicron", "--image-size", "256")
        self.step(f"new variant batch 'omicron': {self.variant_patients} patients")
        self.results["variant_on_champion"] = self.predictions(vcohort, min(self.n_predictions, 30), "variant")
        self.run("data", "add-batch", str(vcohort), "--to", "demo", "--tag", "omicron", user="demo-researcher")
        self.commit_data("dataset demo: omicron batch")
        self.step("variant batch added to dataset 'demo' → new DVC version (the old one stays retrievable)")
        state = self.pipeline("retrain")
        version = str(state.get("model_version") or state.get("challenger_version") or state.get("version"))
        self.results["challenger_version"] = version
        comparison = state.get("comparison") or {}
        self.results["comparison"] = comparison
        self.step(f"retrained: challenger v{version} registered (alias challenger, status candidate; "
                  f"approval stays human)")
        self.echo("     challenger vs champion: " + _comparison_line(comparison))

    def compliance(self) -> None:
        today = datetime.now(timezone.utc).date()
        start, end = (today - timedelta(days=1)).isoformat(), (today + timedelta(days=1)).isoformat()
        reports = self.workdir / "reports"
        reports.mkdir(exist_ok=True)
        for fmt in ("pdf", "json"):
            self.run("audit", "export", "--from", start, "--to", end, "--format", fmt,
                     "--out", str(reports / f"compliance-report.{fmt}"), user="demo-compliance")
        self.results["reports"] = [str(reports / "compliance-report.pdf"), str(reports / "compliance-report.json")]
        self.step(f"compliance report exported: {reports / 'compliance-report.pdf'} and .json")
        out = self.run("audit", "verify", "--json")
        v = json.loads(out[out.find("{"):])
        self.step(f"audit chain verified: {v.get('n_entries', '?')} entries intact, head hash "
                  f"{str(v.get('head_hash', ''))[:16]}…")

    def stop(self) -> None:
        if self.pacs_server is not None:
            self.pacs_server.stop()
            self.pacs_server = None
        for proc in (self.server, self.prometheus, self.listener):
            if proc and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        if self.server:
            self.step("API server stopped")
            self.server = None

    def summary(self) -> None:
        tracking = f"sqlite:///{self.home / 'mlflow.db'}"
        self.echo("")
        self.echo("Where everything is:")
        self.echo(f"  MLflow UI      : mlflow ui --backend-store-uri {tracking} "
                  f"--default-artifact-root {self.home / 'mlartifacts'}")
        self.echo(f"  dataset (DVC) : {self.project / 'data' / 'demo'}  (cxr data versions, with CXR_PROJECT_ROOT="
                  f"{self.project})")
        self.echo(f"  reports       : {', '.join(self.results.get('reports', []))}")
        self.echo(f"  API           : cxr serve  →  http://127.0.0.1:8000/docs  (set CXR_HOME={self.home})")
        self.echo("  dashboards    : grafana/dashboards/*.json (provisioning in grafana/provisioning)")
        if self.results.get("pacs"):
            self.echo(f"  PACS (Orthanc): study {self.results['pacs']['study_instance_uid']} holds the SR + secondary "
                      f"capture; Orthanc's files: {self.workdir / 'pacs'} (run `Orthanc {self.workdir / 'pacs'}"
                      f"/orthanc.json` to browse it at its HttpPort)")
        self.echo(f"  logs          : {self.workdir / 'logs'}")
        self.echo("Research software, NOT a medical device; the synthetic cohort proves the plumbing, not clinical value.")


def _comparison_line(comparison: dict) -> str:
    """One line from the pipeline's headline table: COVID-19 sensitivity per test set, with 95 % CIs."""
    parts = []
    for name, row in (comparison.get("headline") or {}).items():
        try:
            cp, ch = row["champion"], row["challenger"]
            parts.append(f"{name}: sensitivity {cp['value']:.2f} [{cp['ci_low']:.2f}–{cp['ci_high']:.2f}] → "
                         f"{ch['value']:.2f} [{ch['ci_low']:.2f}–{ch['ci_high']:.2f}]")
        except (KeyError, TypeError, ValueError):
            continue
    return "\n     ".join(parts) if parts else "see the comparison report in MLflow (pipeline run artifacts)"


def run_demo(workdir: Path, *, patients: int = 160, variant_patients: int = 60, epochs: int = 8,
             image_size: int = 64, encoder: str = "small", predictions: int = 40, echo=typer.echo) -> dict:
    demo = Demo(workdir, patients=patients, variant_patients=variant_patients, epochs=epochs,
                image_size=image_size, encoder=encoder, predictions=predictions, echo=echo)
    t0 = time.time()
    try:
        demo.prepare()
        demo.users()
        demo.cohort()
        demo.train_and_release()
        demo.start_api()
        demo.results["in_distribution"] = demo.predictions(demo.workdir / "cohort", predictions, "in-distribution")
        demo.pacs(demo.workdir / "cohort")
        demo.metrics()
        demo.variant()
        demo.compliance()
    finally:
        demo.stop()
    demo.summary()
    demo.results["seconds"] = round(time.time() - t0, 1)
    echo(f"Demo finished in {demo.results['seconds']:.0f} s.")
    return demo.results
