"""``benchmarks/api_latency.py``'s own parts. The floors it compares the API with must wait for the whole
upload before they answer: a floor that answered early would make the API's overhead look larger than it
is (real servers on loopback: the uvicorn floor through uvicorn, the wire floor as its own process).
``--device cuda`` must refuse a machine without CUDA rather than time the CPU under a GPU label."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from api_fixtures import free_port

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _serve(argv: list[str], url: str) -> subprocess.Popen:
    proc = subprocess.Popen(argv, cwd=str(BENCH), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 30
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        try:
            httpx.get(url, timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    pytest.fail("floor server did not start")


def _upload(size: int) -> tuple[dict, bytes]:
    body = bytes(range(256)) * (size // 256)
    return {"image": ("cxr.dcm", body, "application/dicom")}, body


def test_uvicorn_floor_receives_the_whole_multipart_upload_on_a_kept_alive_connection():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve([sys.executable, "-m", "uvicorn", "_uvicorn_floor_app:build", "--factory", "--port", str(port),
                   "--log-level", "warning"], url)
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            for size in (3 * 2**20, 2**16):
                files, body = _upload(size)
                request = client.build_request("POST", "/v1/predictions", files=files, data={"site": "bench"})
                sent = int(request.headers["content-length"])
                assert sent > len(body)  # multipart framing around the image
                answer = client.send(request)
                assert answer.status_code == 200
                assert int(answer.text) == sent
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_wire_floor_answers_each_request_only_after_its_whole_body():
    port = free_port()
    proc = _serve([sys.executable, str(BENCH / "_wire_floor_server.py"), str(port)], f"http://127.0.0.1:{port}/")
    try:
        body = b"x" * (2 * 2**20)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            head = f"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n\r\n".encode()
            conn.sendall(head + body[:-1])
            conn.settimeout(0.5)
            with pytest.raises(TimeoutError):  # one byte short: no answer yet
                conn.recv(100)
            conn.settimeout(10)
            conn.sendall(body[-1:] + head + body)  # the last byte, then a second request on the same connection
            answers = b""
            while answers.count(b"HTTP/1.1 200 OK") < 2:
                chunk = conn.recv(4096)
                assert chunk, "the wire floor closed the connection"
                answers += chunk
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA: nothing to refuse")
def test_device_cuda_is_refused_without_cuda(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH / "api_latency.py"), "--home", str(tmp_path), "--device", "cuda"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "--device cuda: CUDA is not available on this machine" in done.stderr
    assert not (tmp_path / "bench-server.log").exists()  # refused before any server or bootstrap
