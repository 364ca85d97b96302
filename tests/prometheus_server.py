"""A real Prometheus (Debian package) for integration tests, on a free loopback port.

Usage, as a context manager or through the pytest fixture factory below::

    with PrometheusServer(target="127.0.0.1:8123", workdir=tmp_path) as prom:
        prom.wait_for_scrapes(2)
        prom.query('cxr:sensitivity:ratio1h{site="A"}')   # -> list of {"metric": {...}, "value": [ts, "0.9"]}

    # in a test module
    from tests.prometheus_server import prometheus_factory  # noqa: F401  (the fixture)
    def test_x(prometheus_factory):
        prom = prometheus_factory("127.0.0.1:8123")

The config is the repo's ``prometheus/prometheus.yml`` with only the scrape target of job
``cxr-api`` (and the scrape/evaluation intervals, 1 s) replaced, and the repo's rule files
(``prometheus/rules/*.yml``) by absolute path: the job name, metrics path and rules under test are
the deployed ones. Other scrape jobs of the repo config are dropped (they point at compose hosts).
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = REPO_ROOT / "prometheus"
REPO_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
API_JOB = "cxr-api"


def prometheus_binary() -> str | None:
    for candidate in ("/usr/bin/prometheus", shutil.which("prometheus")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_config(target: str, *, interval: str = "1s", metrics_path: str | None = None,
                  rule_files: list[Path] | None = None) -> dict[str, Any]:
    """The repo config with job ``cxr-api`` scraping ``target`` every ``interval``."""
    config = yaml.safe_load(REPO_CONFIG.read_text())
    config.setdefault("global", {})
    config["global"]["scrape_interval"] = interval
    config["global"]["evaluation_interval"] = interval
    config["global"]["scrape_timeout"] = interval
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == API_JOB]
    if len(jobs) != 1:
        raise AssertionError(f"{REPO_CONFIG} must have exactly one job {API_JOB!r}")
    job = jobs[0]
    labels = (job.get("static_configs") or [{}])[0].get("labels", {})
    job["static_configs"] = [{"targets": [target], "labels": labels}]
    if metrics_path:
        job["metrics_path"] = metrics_path
    config["scrape_configs"] = [job]
    if rule_files is None:
        rule_files = []
        for pattern in config.get("rule_files", []):
            rule_files.extend(sorted(PROMETHEUS_DIR.glob(pattern)))
        if not rule_files:
            raise AssertionError(f"rule_files of {REPO_CONFIG} match nothing")
    config["rule_files"] = [str(Path(p).resolve()) for p in rule_files]
    return config


class PrometheusServer:
    """Start ``prometheus`` on 127.0.0.1:<free port> scraping ``target``; stop it on exit."""

    def __init__(self, target: str, workdir: Path, *, interval: str = "1s", metrics_path: str | None = None,
                 rule_files: list[Path] | None = None, startup_timeout: float = 30.0) -> None:
        binary = prometheus_binary()
        if binary is None:
            raise FileNotFoundError("prometheus binary not found (apt-get install prometheus; `make test` does)")
        self.binary = binary
        self.target = target
        self.workdir = Path(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = render_config(target, interval=interval, metrics_path=metrics_path, rule_files=rule_files)
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.log_path = self.workdir / "prometheus.log"

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "PrometheusServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [self.binary, f"--config.file={config_path}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle",
             "--storage.tsdb.retention.time=1d"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=self.workdir,
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"prometheus not ready in {self.startup_timeout}s:\n{self.log()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "PrometheusServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # -- HTTP API -------------------------------------------------------------------------------
    def api(self, path: str, params: dict[str, Any] | None = None) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as err:
            body = json.load(err)
            raise AssertionError(f"Prometheus API {path} {params}: {body.get('errorType')}: {body.get('error')}") from None
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus API {path}: {body}")
        return body["data"]

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query: the result vector (``[{"metric": {...}, "value": [ts, "str"]}, ...]``)."""
        params: dict[str, Any] = {"query": promql}
        if at is not None:
            params["time"] = at
        data = self.api("query", params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_values(self, promql: str) -> dict[tuple[tuple[str, str], ...], float]:
        """``{sorted label items: float value}`` for an instant query."""
        return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in self.query(promql)}

    def query_range(self, promql: str, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
        """Range query (what Grafana sends for a time series panel): ``[{"metric", "values"}, ...]``."""
        data = self.api("query_range", {"query": promql, "start": start, "end": end, "step": step})
        return data["result"]

    def label_values(self, label: str, match: str | None = None) -> list[str]:
        """Values of ``label`` (optionally only on series matching ``match``): Grafana's
        ``label_values(match, label)`` template-variable query."""
        params = {"match[]": match} if match else None
        return sorted(self.api(f"label/{urllib.parse.quote(label)}/values", params))

    def alerts(self, name: str | None = None) -> list[dict[str, Any]]:
        """Active (pending or firing) alerts, optionally only those named ``name``."""
        alerts = self.api("alerts")["alerts"]
        return [a for a in alerts if name is None or a["labels"].get("alertname") == name]

    def targets(self) -> list[dict[str, Any]]:
        return self.api("targets")["activeTargets"]

    def rule_groups(self) -> list[dict[str, Any]]:
        return self.api("rules")["groups"]

    def wait_until(self, predicate, timeout: float = 20.0, interval: float = 0.25, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(interval)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last: {last!r})\n{self.log()}")

    def wait_for_scrapes(self, n: int = 1, timeout: float = 20.0) -> None:
        """Wait until the target has been scraped successfully ``n`` more times from now."""
        def scrape_count() -> float:
            res = self.query(f'count_over_time(up{{job="{API_JOB}"}}[1h])')
            return float(res[0]["value"][1]) if res else 0.0

        def up() -> bool:
            res = self.query(f'up{{job="{API_JOB}"}}')
            return bool(res) and res[0]["value"][1] == "1"

        start = scrape_count()
        self.wait_until(lambda: scrape_count() >= start + n and up(), timeout=timeout, what=f"{n} scrapes of {self.target}")


@pytest.fixture()
def prometheus_factory(tmp_path: Path):
    """``prometheus_factory(target, **kw) -> PrometheusServer`` (started; stopped at teardown).

    Skips with the reason when the Prometheus binary is missing (``make test`` installs it)."""
    if prometheus_binary() is None:
        pytest.skip("prometheus binary not installed (apt-get install prometheus; `make test` runs system-deps)")
    servers: list[PrometheusServer] = []

    def start(target: str, **kwargs: Any) -> PrometheusServer:
        server = PrometheusServer(target, tmp_path / f"prometheus-{len(servers)}", **kwargs)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
