"""Submitting the compiled pipeline to a Kubeflow Pipelines endpoint (``kfp.Client``).

The cluster pulls the image named in the package (build it from the repository's ``Dockerfile``);
components install nothing at run time.
"""
from __future__ import annotations

import tempfile
from pathlib import Path


class SubmitError(RuntimeError):
    pass

def with_image(package: Path, image: str, out: Path) -> Path:
    """A copy of a compiled pipeline whose tasks all run ``image`` (e.g. ``registry.example/covid-cxr:0.1.0-gpu``)."""
    import yaml

    spec = yaml.safe_load(Path(package).read_text())
    for executor in spec["deploymentSpec"]["executors"].values():
        executor["container"]["image"] = image
    out.write_text(yaml.safe_dump(spec, sort_keys=True))
    return out

def submit_pipeline(host: str, *, experiment: str, arguments: dict, run_name: str | None = None,
                    package: Path | None = None, namespace: str | None = None, timeout: float = 5.0,
                    image: str | None = None) -> dict:
    """Submit the (freshly compiled) pipeline to a Kubeflow Pipelines endpoint. Raises SubmitError."""
    import httpx

    host = host.rstrip("/")
    if not host.startswith(("http://", "https://")):
        raise SubmitError(f"--host must be an http(s) URL of the Kubeflow Pipelines API, got {host!r}")
    # Pre-flight: kfp.Client retries an unreachable host for ~30 s and then raises a TimeoutError
    # naming no URL; one short request tells the user at once what is wrong.
    try:
        r = httpx.get(f"{host}/apis/v2beta1/healthz", timeout=timeout)
    except httpx.HTTPError as exc:
        raise SubmitError(
            f"cannot reach Kubeflow Pipelines at {host} ({type(exc).__name__}: {exc}). Check the URL, or "
            "port-forward the API: `kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80` and use "
            "--host http://localhost:8080") from exc
    if r.status_code in (401, 403):
        raise SubmitError(f"Kubeflow Pipelines at {host} refused the request (HTTP {r.status_code}): "
                          "authenticate (e.g. KF_PIPELINES_SA_TOKEN_PATH or a session cookie)")
    if r.status_code >= 400:
        raise SubmitError(f"{host} answered HTTP {r.status_code} on /apis/v2beta1/healthz: "
                          "not a Kubeflow Pipelines v2 API endpoint?")
    import kfp

    from pipelines.kfp_pipeline import BASE_IMAGE, compile_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        path = package or compile_pipeline(Path(tmp) / "covid_cxr_training.yaml")
        if image:
            path = with_image(path, image, Path(tmp) / "covid_cxr_training.image.yaml")
        try:
            client = kfp.Client(host=host, namespace=namespace or "kubeflow")
            run = client.create_run_from_pipeline_package(
                str(path), arguments=arguments, run_name=run_name, experiment_name=experiment,
                namespace=namespace, enable_caching=False)
        except Exception as exc:  # noqa: BLE001 - API errors of any kind: one clear line
            raise SubmitError(f"Kubeflow Pipelines at {host} did not accept the run: "
                              f"{type(exc).__name__}: {str(exc).strip()[:500]}") from exc
    run_id = getattr(run, "run_id", None)
    return {"run_id": run_id, "experiment": experiment, "host": host,
            "url": f"{host}/#/runs/details/{run_id}", "image": image or BASE_IMAGE}
