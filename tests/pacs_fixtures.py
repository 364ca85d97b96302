"""A real PACS (Orthanc) and a real modality (dcmtk) for the DICOM integration tests and benchmark.

``Orthanc.start(workdir)`` writes a JSON configuration (HttpPort, DicomPort, DicomAet,
StorageDirectory, IndexDirectory, DicomModalities, "Plugins": []) with free loopback ports and runs
the Debian ``Orthanc`` binary on it; its REST API (``/tools/find``, ``/instances/ID/simplified-tags``,
``/instances/ID/file``) is how the tests see what the PACS received. ``ensure_tools()`` installs
the Debian packages (orthanc, dcmtk, dicom3tools) when they are missing and the process may
(root + apt-get), else it names what is missing so the caller can skip cleanly.

``chest_file(...)`` writes a synthetic frontal chest radiograph (the model tests' learnable
pattern, 12-bit) as CR/DX in any transfer syntax ``tests/dicom_factory.py`` encodes, with
fresh UIDs in a given study; the patient identifiers are the factory's fake ones.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np

TOOLS = {"Orthanc": "orthanc", "storescu": "dcmtk", "echoscu": "dcmtk", "dsrdump": "dcmtk",
         "dciodvfy": "dicom3tools"}
EXTRA_PATHS = ("/usr/sbin", "/usr/bin")


def which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in EXTRA_PATHS:
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return None


def ensure_tools() -> list[str]:
    """Install missing Debian packages when possible; return the names of the tools still missing."""
    missing = sorted({pkg for tool, pkg in TOOLS.items() if which(tool) is None})
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                       capture_output=True, env=env, timeout=900)
    return [tool for tool in TOOLS if which(tool) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    AET = "ORTHANC"

    def __init__(self, workdir: Path, modalities: dict[str, list] | None = None) -> None:
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
            "Name": "cxr-test-pacs", "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": self.AET,
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


# ------------------------------------------------------------------ modality side
def chest_pixels(seed: int, size: int = 256, label: str = "covid19") -> np.ndarray:
    """12-bit stored values of a synthetic frontal chest radiograph (the model tests' pattern)."""
    from model_fixtures import synth_image

    img = synth_image(label, np.random.default_rng(seed), size=size)[0].astype(np.float32)
    return np.clip(np.round(img * 4095), 0, 4095).astype(np.uint16)


def chest_file(path: Path, *, study_uid: str, index: int = 0, modality: str = "CR", view: str | None = "PA",
               transfer_syntax: str | None = None, sop_class_uid: str | None = None, size: int = 256,
               seed: int | None = None, accession: str = "ACC20200101", bits: int = 12) -> dict:
    """Write one instance of ``study_uid``; returns its UIDs."""
    import pydicom
    from dicom_factory import make_dicom
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = chest_pixels(index if seed is None else seed, size)
    if bits == 8:
        pixels = (pixels >> 4).astype(np.uint8)
    data = make_dicom(modality, rows=size, cols=size, bits=bits, view=view, pixels=pixels,
                      transfer_syntax=transfer_syntax or ExplicitVRLittleEndian, sop_class_uid=sop_class_uid)
    ds = pydicom.dcmread(io.BytesIO(data))
    sop = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[study_uid, modality, str(view), "series"])
    ds.InstanceNumber = index + 1
    ds.StudyID = "S1"
    ds.StudyTime = "101500"
    ds.SeriesNumber = 1
    ds.AccessionNumber = accession
    ds.ReferringPhysicianName = "REFERRER^TEST"
    ds.save_as(path, enforce_file_format=True)
    return {"sop_instance_uid": sop, "study_uid": study_uid, "path": Path(path)}


def storescu(host: str, port: int, aet: str, files: list[Path], *, extra: tuple[str, ...] = (),
             timeout: float = 120.0, calling: str = "MODALITY") -> subprocess.CompletedProcess:
    """dcmtk's storescu: one association carrying ``files``."""
    return subprocess.run([which("storescu"), "-v", "-aet", calling, "-aec", aet, *extra, host, str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=timeout)


def echoscu(host: str, port: int, aet: str, timeout: float = 10.0) -> subprocess.CompletedProcess:
    return subprocess.run([which("echoscu"), "-aet", "MODALITY", "-aec", aet, "-to", "5", host, str(port)],
                          capture_output=True, text=True, timeout=timeout)
