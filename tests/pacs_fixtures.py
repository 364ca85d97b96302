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
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from app.dicom.orthanc import EXTRA_PATHS, Orthanc, free_port, which  # noqa: F401 - re-exported for the tests

TOOLS = {"Orthanc": "orthanc", "storescu": "dcmtk", "echoscu": "dcmtk", "dsrdump": "dcmtk",
         "dciodvfy": "dicom3tools"}




def ensure_tools() -> list[str]:
    """Install missing Debian packages when possible; return the names of the tools still missing."""
    missing = sorted({pkg for tool, pkg in TOOLS.items() if which(tool) is None})
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                       capture_output=True, env=env, timeout=900)
    return [tool for tool in TOOLS if which(tool) is None]






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
