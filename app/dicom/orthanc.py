"""Orthanc as the example PACS: a generated JSON configuration on loopback ports, run from Debian's binary.

Used by ``cxr demo`` (modality → listener → PACS) and by the DICOM integration tests and benchmark.
``Orthanc(workdir).start()`` writes HttpPort, DicomPort, DicomAet, StorageDirectory, IndexDirectory,
DicomModalities and ``"Plugins": []`` and waits for its REST API; ``find_instances``, ``tags``,
``study_instances`` and ``wait_for`` read what the PACS received. Binding is 127.0.0.1 only, with no
remote access: a real hospital PACS is configured as in docs/DEPLOYMENT.md.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

EXTRA_PATHS = ("/usr/sbin", "/usr/bin")


def which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in EXTRA_PATHS:
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return None

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

class Orthanc:
    AET = "ORTHANC"

    def __init__(self, workdir: Path, modalities: dict[str, list] | None = None, name: str = "cxr-test-pacs") -> None:
        self.name = name
        self.workdir = Path(workdir)
        self.http_port, self.dicom_port = free_port(), free_port()
        self.modalities = modalities or {}
        self.proc: subprocess.Popen | None = None
        self.log = self.workdir / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def destination(self) -> str:
        return f"{self.AET}@127.0.0.1:{self.dicom_port}"

    def config(self) -> dict:
        return {
            "Name": self.name, "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": self.AET,
            "StorageDirectory": str(self.workdir / "storage"), "IndexDirectory": str(self.workdir / "index"),
            "DicomModalities": self.modalities, "Plugins": [], "HttpBindAddress": "127.0.0.1",
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True, "DicomCheckModalityHost": False, "StorageCompression": False,
            "ConcurrentJobs": 2, "HttpThreadsCount": 8, "DicomThreadsCount": 8,
        }

    def start(self, timeout: float = 30.0) -> "Orthanc":
        import httpx

        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=2))
        fh = open(self.log, "ab")
        self.proc = subprocess.Popen([which("Orthanc"), str(cfg)], stdout=fh, stderr=subprocess.STDOUT,
                                     cwd=self.workdir)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/system", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc not ready in {timeout} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    # ------------------------------------------------------------------ REST
    def get(self, path: str):
        import httpx

        r = httpx.get(self.url + path, timeout=30)
        r.raise_for_status()
        return r

    def find_instances(self, **query: str) -> list[str]:
        import httpx

        r = httpx.post(self.url + "/tools/find", json={"Level": "Instance", "Query": query}, timeout=30)
        r.raise_for_status()
        return r.json()

    def tags(self, instance_id: str) -> dict:
        return self.get(f"/instances/{instance_id}/simplified-tags").json()

    def file(self, instance_id: str) -> bytes:
        return self.get(f"/instances/{instance_id}/file").content

    def study_instances(self, study_uid: str) -> list[dict]:
        return [{"id": i, **self.tags(i)} for i in self.find_instances(StudyInstanceUID=study_uid)]

    def wait_for(self, study_uid: str, predicate, timeout: float = 60.0, poll: float = 0.25) -> list[dict]:
        """Instances of a study once ``predicate(instances)`` holds (the last seen list on timeout)."""
        deadline = time.time() + timeout
        seen: list[dict] = []
        while time.time() < deadline:
            seen = self.study_instances(study_uid)
            if predicate(seen):
                return seen
            time.sleep(poll)
        return seen
