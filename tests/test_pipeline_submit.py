"""`cxr pipeline submit --host URL`, tested up to the point where a Kubeflow cluster is needed.

A real Kubeflow Pipelines cluster (Kubernetes, Argo, GPU nodes, the `covid-cxr:latest` image) cannot
run here. What is tested for real: the compile, the pre-flight check, `kfp.Client` construction and
the HTTP requests it makes (experiment look-up/creation, run creation with the whole pipeline spec
inline). The only stand-in is the cluster's REST API: a tiny local HTTP server that answers the
KFP v2beta1 endpoints the client calls and records the payload; it is a mock of the cluster, not of
our code or of kfp.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from app.cli import root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RESEARCHER_PW = "rita-copper-lantern-27"


def _submit(args: list[str]):
    """`cxr pipeline submit` as an authenticated researcher (the submitted run names her)."""
    from compliance.users import create_user, get_user

    if get_user("rita") is None:
        create_user("rita", "researcher", RESEARCHER_PW, actor="test")
    return CliRunner().invoke(root, ["pipeline", "submit", *args, "--as", "rita", "--password-stdin"],
                              input=RESEARCHER_PW + "\n", env={"CXR_TOKEN": None})


def test_unreachable_host_gives_a_clear_error_quickly(cxr_env) -> None:
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    t0 = time.monotonic()
    res = _submit(["--host", url, "--timeout", "2"])
    assert res.exit_code == 1
    out = res.output
    assert "cannot reach Kubeflow Pipelines at" in out and url in out
    assert "Traceback" not in out
    assert time.monotonic() - t0 < 20


def test_host_without_scheme_is_refused(cxr_env) -> None:
    res = _submit(["--host", "kubeflow.example"])
    assert res.exit_code == 1 and "http(s) URL" in res.output


class _FakeKfpApi(BaseHTTPRequestHandler):
    """Stand-in for a Kubeflow Pipelines v2beta1 REST API (the cluster); records what it receives."""

    received: list = []

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        self.received.append(("GET", self.path, None))
        if self.path.startswith("/apis/v2beta1/healthz"):
            return self._send(200, {"multi_user": False})
        if self.path.startswith("/apis/v2beta1/experiments"):
            return self._send(200, {"experiments": [], "total_size": 0})
        return self._send(404, {"error": "not found"})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self.received.append(("POST", self.path, body))
        if self.path.startswith("/apis/v2beta1/experiments"):
            return self._send(200, {"experiment_id": "exp-1", "display_name": body.get("display_name")})
        if self.path.startswith("/apis/v2beta1/runs"):
            return self._send(200, {"run_id": "run-123", "display_name": body.get("display_name"),
                                    "experiment_id": body.get("experiment_id"), "state": "PENDING"})
        return self._send(404, {"error": "not found"})


@pytest.fixture()
def fake_cluster():
    _FakeKfpApi.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeKfpApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _FakeKfpApi.received
    server.shutdown()


def test_submit_sends_the_compiled_pipeline_with_gpu_request(cxr_env, fake_cluster, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # kfp.Client reads ~/.config/kfp/context.json
    url, received = fake_cluster
    from compliance.users import create_user

    create_user("alice", "researcher", "alice-quiet-meadow-35", actor="test")
    args = ["pipeline", "submit", "--host", url, "--experiment", "variant-retraining", "--dataset", "cohort",
            "--external", "site-b", "--epochs", "3", "--as", "alice", "--nodes", "2", "--gpus-per-node", "4"]
    res = CliRunner().invoke(root, args, env={"CXR_TOKEN": None})  # a name alone: refused, nothing sent
    assert res.exit_code == 1 and "needs an authenticated user" in res.output and not received
    res = CliRunner().invoke(root, [*args, "--password-stdin"], input="alice-quiet-meadow-35\n",
                             env={"CXR_TOKEN": None})
    assert res.exit_code == 0, res.output
    out, _ = json.JSONDecoder().raw_decode(res.stdout[res.stdout.index("{"):])
    assert out["run_id"] == "run-123" and out["image"] == "covid-cxr:latest"

    runs = [b for m, p, b in received if m == "POST" and p.startswith("/apis/v2beta1/runs")]
    assert len(runs) == 1
    run = runs[0]
    assert run["experiment_id"] == "exp-1"
    rc = run["runtime_config"]["parameters"]
    assert rc["dataset_name"] == "cohort" and json.loads(rc["external_datasets"]) == ["site-b"]
    assert rc["epochs"] == 3 and rc["actor"] == "alice"
    assert (rc["train_nodes"], rc["gpus_per_node"]) == (2, 4)  # the TrainJob's size (pipelines/trainjob.py)
    spec = run["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "covid-cxr-training"
    train = spec["deploymentSpec"]["executors"]["exec-train-model"]["container"]
    assert train["image"] == "covid-cxr:latest"
    assert "accelerator" not in train["resources"]  # the GPUs belong to the TrainJob's pods
    experiments = [b for m, p, b in received if m == "POST" and p.startswith("/apis/v2beta1/experiments")]
    assert experiments and experiments[0]["display_name"] == "variant-retraining"


def test_submit_can_point_every_task_at_another_image(cxr_env, fake_cluster, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    url, received = fake_cluster
    image = "registry.example.org/covid-cxr:0.1.0-gpu"
    res = _submit(["--host", url, "--image", image])
    assert res.exit_code == 0, res.output
    run = [b for m, p, b in received if m == "POST" and p.startswith("/apis/v2beta1/runs")][0]
    images = {e["container"]["image"] for e in run["pipeline_spec"]["deploymentSpec"]["executors"].values()}
    assert images == {image}
    assert run["runtime_config"]["parameters"]["train_image"] == image  # the TrainJob runs it too
