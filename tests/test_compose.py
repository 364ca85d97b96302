"""docker-compose.yml (a hospital site) parses with Debian's docker-compose, and every port, volume,
config path and setting name it uses exists in the repo and agrees with the app, Prometheus and
Grafana configuration. (No Docker engine here: nothing is started.)"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
SECRETS = {"POSTGRES_PASSWORD": "pg-secret", "MINIO_ROOT_PASSWORD": "minio-secret",
           "CXR_PSEUDONYM_KEY": "0" * 64, "GRAFANA_ADMIN_PASSWORD": "grafana-secret",
           "ORTHANC_ADMIN_PASSWORD": "orthanc-secret",
           "CXR_TLS_CERT": "/etc/cxr/tls/tls.crt", "CXR_TLS_KEY": "/etc/cxr/tls/tls.key"}
LONG_RUNNING = {"api", "mlflow", "postgres", "minio", "prometheus", "grafana", "dicom", "orthanc", "tls-proxy"}


def _run_config(env_overrides: dict[str, str]) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose not installed (Debian package docker-compose; `make test` installs it)")
    env = {k: v for k, v in os.environ.items() if k not in SECRETS and not k.startswith(("CXR_", "COMPOSE_"))}
    env.update(env_overrides)
    return subprocess.run([exe, "-f", str(COMPOSE), "--project-directory", str(REPO), "config"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=60)


@pytest.fixture(scope="module")
def rendered() -> dict:
    res = _run_config(SECRETS)
    assert res.returncode == 0, res.stderr
    return yaml.safe_load(res.stdout)


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_refuses_to_render_without_secrets():
    res = _run_config({})
    assert res.returncode != 0
    assert "POSTGRES_PASSWORD" in res.stderr or "CXR_PSEUDONYM_KEY" in res.stderr


def test_services_and_healthchecks(rendered):
    services = rendered["services"]
    assert LONG_RUNNING <= set(services)
    for name in LONG_RUNNING:
        hc = services[name].get("healthcheck")
        assert hc and hc.get("test"), f"{name} has no healthcheck"
        assert services[name].get("restart") == "unless-stopped", name
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, (name, dep)
            if cond.get("condition") == "service_healthy":
                assert services[dep].get("healthcheck"), (name, dep)


def test_bind_mounts_exist_in_the_repo_and_named_volumes_are_declared(rendered, raw):
    declared = set(rendered.get("volumes") or {})
    seen_named = set()
    for name, svc in raw["services"].items():
        for spec in svc.get("volumes", []):
            source = spec.split(":")[0]
            if source.startswith("."):
                path = (REPO / source).resolve()
                assert path.exists(), f"{name}: bind mount {source} does not exist in the repo"
                assert REPO in path.parents or path == REPO, (name, source)
                assert spec.endswith(":ro"), f"{name}: repo config {source} should be mounted read-only"
            else:
                seen_named.add(source)
    assert seen_named == declared, (seen_named, declared)
    assert (REPO / "Dockerfile").exists()
    for name in ("api", "mlflow"):
        assert rendered["services"][name]["build"]["dockerfile"] == "Dockerfile"


def _mounts(svc: dict) -> dict[str, str]:
    """container path -> repo-relative source (bind mounts) or volume name."""
    out = {}
    for spec in svc.get("volumes", []):
        parts = spec.split(":")
        out[parts[1]] = parts[0]
    return out


def _env(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    return {k: str(v) for k, v in env.items()}


def _published(svc: dict) -> dict[int, int]:
    """container port -> host port."""
    out = {}
    for spec in svc.get("ports", []):
        text = str(spec).split("/")[0]
        parts = text.split(":")
        out[int(parts[-1])] = int(parts[-2])
    return out


def test_api_environment_matches_app_settings(rendered, raw):
    from core.config import Settings

    fields = set(Settings.model_fields)
    api = rendered["services"]["api"]
    env = _env(api)
    for name in env:
        if name.startswith("CXR_"):
            field = name.removeprefix("CXR_").lower()
            assert field in fields, f"{name} is not a setting of app/config.py (fields: {sorted(fields)})"
    # state folder on a volume
    assert env["CXR_HOME"] in _mounts(raw["services"]["api"])
    # port: setting = published container port = the command's --port = Prometheus' scrape target
    port = int(env["CXR_API_PORT"])
    assert port in _published(api)
    command = api["command"]
    assert command[command.index("--port") + 1] == str(port)
    assert env["CXR_API_HOST"] == "0.0.0.0"
    # MLflow: both spellings agree and name the mlflow service's port
    assert env["CXR_MLFLOW_TRACKING_URI"] == env["MLFLOW_TRACKING_URI"]
    mlflow_url = urlparse(env["CXR_MLFLOW_TRACKING_URI"])
    assert mlflow_url.hostname == "mlflow"
    mlflow_cmd = " ".join(rendered["services"]["mlflow"]["command"])
    assert f"--port {mlflow_url.port}" in mlflow_cmd
    assert "--serve-artifacts" in mlflow_cmd and "s3://mlflow/" in mlflow_cmd
    allowed = re.search(r'--allowed-hosts "([^"]+)"', mlflow_cmd).group(1).split(",")
    assert f"mlflow:{mlflow_url.port}" in allowed
    # databases: app DB = POSTGRES_DB on the postgres service; MLflow DB created by postgres-init
    db = urlparse(env["CXR_DATABASE_URL"])
    pg_env = _env(rendered["services"]["postgres"])
    assert db.scheme.startswith("postgresql") and db.hostname == "postgres" and db.port == 5432
    assert db.path.lstrip("/") == pg_env["POSTGRES_DB"] and db.username == pg_env["POSTGRES_USER"]
    assert db.password == SECRETS["POSTGRES_PASSWORD"]
    mlflow_db = urlparse(_env(rendered["services"]["mlflow"])["MLFLOW_BACKEND_STORE_URI"])
    assert mlflow_db.hostname == "postgres"
    assert f"CREATE DATABASE {mlflow_db.path.lstrip('/')}" in " ".join(rendered["services"]["postgres-init"]["command"])
    assert "site/mlflow" in " ".join(rendered["services"]["minio-init"]["command"])


def test_prometheus_gets_the_repo_config_rules_and_api_target(rendered, raw):
    svc = rendered["services"]["prometheus"]
    mounts = _mounts(raw["services"]["prometheus"])
    config_arg = next(a for a in svc["command"] if a.startswith("--config.file="))
    config_path = config_arg.split("=", 1)[1]
    assert mounts[config_path] == "./prometheus/prometheus.yml"
    config = yaml.safe_load((REPO / "prometheus" / "prometheus.yml").read_text())
    config_dir = str(Path(config_path).parent)
    for pattern in config["rule_files"]:
        container_dir = str(Path(config_dir, pattern).parent)
        assert container_dir in mounts, f"rule_files {pattern} resolves to {container_dir}, which is not mounted"
        repo_dir = REPO / mounts[container_dir]
        assert list(repo_dir.glob(Path(pattern).name)), f"no rule files match {pattern} in {repo_dir}"
    api_port = int(_env(rendered["services"]["api"])["CXR_API_PORT"])
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "cxr-api")
    assert job["static_configs"][0]["targets"] == [f"api:{api_port}"]
    listen = next(a for a in svc["command"] if a.startswith("--web.listen-address="))
    assert listen.endswith(":9090") and 9090 in _published(svc)


def test_grafana_provisioning_matches_mounts_and_datasource(rendered, raw):
    mounts = _mounts(raw["services"]["grafana"])
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    providers = yaml.safe_load((REPO / "grafana/provisioning/dashboards/dashboards.yml").read_text())["providers"]
    for provider in providers:
        assert mounts[provider["options"]["path"]] == "./grafana/dashboards"
    home = _env(rendered["services"]["grafana"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (REPO / "grafana" / "dashboards" / Path(home).name).exists()
    ds = yaml.safe_load((REPO / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    url = urlparse(ds["url"])
    assert url.hostname == "prometheus" and url.hostname in rendered["services"]
    prom_listen = next(a for a in rendered["services"]["prometheus"]["command"] if a.startswith("--web.listen-address="))
    assert prom_listen.endswith(f":{url.port}")
    scrape = yaml.safe_load((REPO / "prometheus" / "prometheus.yml").read_text())["global"]["scrape_interval"]
    assert ds["jsonData"]["timeInterval"] == scrape


def test_host_ports_are_unique_and_admin_uis_are_local_only(rendered):
    host_ports = []
    for name, svc in rendered["services"].items():
        for spec in svc.get("ports", []):
            text = str(spec)
            host_ports.append(int(text.split("/")[0].split(":")[-2]))
            if name != "tls-proxy":  # only the HTTPS proxy may face the hospital network
                assert text.startswith("127.0.0.1:"), f"{name} publishes {text} beyond localhost"
    assert len(host_ports) == len(set(host_ports))


def test_the_network_reaches_the_api_over_tls_only(rendered):
    """Plain HTTP stays on loopback; tls-proxy serves HTTPS from the cert/key secrets and forwards the
    client address (the API's per-client rate limit) to api:8000 on the compose network."""
    api = rendered["services"]["api"]
    assert all(str(p).startswith("127.0.0.1:") for p in api.get("ports", [])), api["ports"]
    assert "--proxy-headers" in api["command"]
    proxy = rendered["services"]["tls-proxy"]
    assert 8443 in _published(proxy), proxy["ports"]
    conf = "\n".join(proxy["command"])
    port = _env(api)["CXR_API_PORT"]
    assert "listen 8443 ssl" in conf and f"proxy_pass http://api:{port}" in conf
    assert "ssl_certificate     /run/secrets/tls_cert" in conf and "ssl_certificate_key /run/secrets/tls_key" in conf
    # `$$` in the file is a literal `$` for nginx (docker-compose 1.x prints it still escaped)
    assert re.search(r"X-Forwarded-For \$\$?remote_addr;", conf), conf
    assert {s if isinstance(s, str) else s["source"] for s in proxy["secrets"]} == {"tls_cert", "tls_key"}
    assert rendered["secrets"]["tls_cert"]["file"] == SECRETS["CXR_TLS_CERT"]
    res = _run_config({k: v for k, v in SECRETS.items() if k != "CXR_TLS_KEY"})
    assert res.returncode != 0 and "CXR_TLS_KEY" in res.stderr


def test_dockerfile_installs_the_project_and_serves_on_the_api_port():
    text = (REPO / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM python:3.11-slim" in text
    assert re.search(r"pip install \.", text)
    assert "CXR_API_PORT=8000" in text and "EXPOSE 8000" in text
    for package in ("app", "models", "pipelines", "compliance"):
        assert f"COPY {package} ./{package}" in text
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignore and ".cxr" in ignore


def test_dicom_listener_and_example_pacs_agree(rendered):
    """The listener sends to the example PACS' AE title and DICOM port; the PACS knows the listener as a
    modality (for routing studies to it); Prometheus scrapes the listener's metrics port."""
    import json

    from app.dicom.sender import Destination
    from core.config import Settings

    services = rendered["services"]
    listener, pacs = services["dicom"], services["orthanc"]
    cmd = listener["command"]
    arg = lambda name: cmd[cmd.index(name) + 1]  # noqa: E731
    assert cmd[:3] == ["cxr", "dicom", "listen"]
    dest = Destination.parse(arg("--send-to"))
    pacs_env = _env(pacs)
    assert dest.host == "orthanc" and dest.ae_title == pacs_env["ORTHANC__DICOM_AET"]
    assert dest.port == int(pacs_env["ORTHANC__DICOM_PORT"])
    modalities = json.loads(pacs_env["ORTHANC__DICOM_MODALITIES"])
    assert [arg("--ae-title"), "dicom", int(arg("--port"))] in modalities.values()
    assert int(arg("--port")) in _published(listener)
    for name in _env(listener):
        if name.startswith("CXR_"):
            assert name.removeprefix("CXR_").lower() in Settings.model_fields, name
    config = yaml.safe_load((REPO / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "cxr-dicom")
    assert job["static_configs"][0]["targets"] == [f"dicom:{arg('--metrics-port')}"]
    assert arg("--metrics-host") == "0.0.0.0"
    assert json.loads(pacs_env["ORTHANC__REGISTERED_USERS"]) == {"admin": SECRETS["ORTHANC_ADMIN_PASSWORD"]}
