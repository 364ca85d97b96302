"""deploy/k8s: every manifest validates offline against the Kubernetes 1.37 JSON schemas bundled with
kubernetes-validate (strict: unknown fields are errors), and says what running at scale needs: an API
Deployment with >= 2 replicas, readiness on /readyz and liveness on /healthz, the database URL and the shared
keys from the Secret (never literal), a Service selecting the API pods, PostgreSQL and MLflow."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
K8S_VERSION = "1.37.0"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _all() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for p in MANIFESTS for d in _docs(p)}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_strictly(path: Path):
    import kubernetes_validate

    docs = _docs(path)
    assert docs, path
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: "
                        f"{'.'.join(map(str, exc.path))}: {exc.message}")


def test_validation_is_not_vacuous():
    """The same validator rejects a typo'd field and a wrong type (so the test above can fail)."""
    import kubernetes_validate

    api = _all()[("Deployment", "cxr-api")]
    bad = yaml.safe_load(yaml.safe_dump(api))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = yaml.safe_load(yaml.safe_dump(api))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_example_secret():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(kust["resources"]) == {p.name for p in MANIFESTS} - {"secret.example.yaml"}


def test_api_deployment_replicas_probes_and_secrets():
    objs = _all()
    dep = objs[("Deployment", "cxr-api")]
    assert dep["spec"]["replicas"] >= 2
    pod = dep["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["port"] in ("http", port)
    env = {e["name"]: e for e in c["env"]}
    for name, key in {"CXR_DATABASE_URL": "database-url", "CXR_MLFLOW_TRACKING_URI": "mlflow-tracking-uri",
                      "CXR_PSEUDONYM_KEY": "pseudonym-key", "CXR_AUDIT_HMAC_KEY": "audit-hmac-key"}.items():
        assert "value" not in env[name], f"{name} must come from the Secret"
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "cxr-secrets", "key": key}
    # the Service reaches these pods on that port
    svc = objs[("Service", "cxr-api")]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["targetPort"] in ("http", port)
    assert objs[("PodDisruptionBudget", "cxr-api")]["spec"]["minAvailable"] >= 1
    # settings the app reads exist (CXR_* env names map to app settings)
    from core.config import Settings

    for name in env:
        if name.startswith("CXR_"):
            assert name[4:].lower() in Settings.model_fields, name


def test_postgres_mlflow_and_secret_example():
    objs = _all()
    pg = objs[("StatefulSet", "postgres")]
    assert pg["spec"]["volumeClaimTemplates"] and objs[("Service", "postgres")]
    ml = objs[("Deployment", "mlflow")]
    env = {e["name"]: e for e in ml["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["key"] == "mlflow-backend-store-uri"
    assert objs[("Service", "mlflow")]["spec"]["ports"][0]["port"] == 5000
    secret = objs[("Secret", "cxr-secrets")]
    keys_used = set()
    for d in objs.values():
        for node in _walk(d):
            if isinstance(node, dict) and "secretKeyRef" in node:
                assert node["secretKeyRef"]["name"] == "cxr-secrets"
                keys_used.add(node["secretKeyRef"]["key"])
    from pipelines.trainjob import SECRET_ENV, SECRET_NAME

    assert SECRET_NAME == "cxr-secrets"
    assert keys_used | set(SECRET_ENV.values()) == set(secret["stringData"])  # every key used, none missing
    assert all("CHANGE-ME" in v or v == "http://mlflow:5000" for v in secret["stringData"].values())


def _walk(node):
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)
