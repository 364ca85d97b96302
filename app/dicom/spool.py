"""Durable spool of received DICOM instances: nothing acknowledged is ever lost.

The C-STORE handler writes each instance here *before* answering Success: the bytes go to a
hidden temporary file created with mode 0600 (``O_CREAT | O_EXCL``), are ``fsync``'d, renamed to
their final name and the folder is ``fsync``'d, so after a power cut the file is either complete
and visible or absent (and then the modality never got a Success and sends again). An instance is
deleted only once its result objects were accepted by the PACS (or its refusal was recorded in the
audit trail). After a crash :meth:`Spool.recover` removes half-written temporary files and returns
every complete instance, oldest first, for processing.

Instances that made the analysis itself fail (a bug, not a refusal) are moved to ``quarantine/``
(still 0600, counted in the metrics) instead of being retried forever or deleted.

The spool holds the received files as they are (with the patient's identifiers) only until they
are processed; it lives under ``CXR_HOME`` (mode 0700), which a site puts on an encrypted volume.
"""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

SUFFIX = ".dcm"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.quarantine_dir = self.root / "quarantine"
        for d in (self.root, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)

    # ------------------------------------------------------------------ writing
    def put(self, data: bytes) -> Path:
        """Store one received instance durably; returns its path once it is safe on disk."""
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex}{SUFFIX}"
        tmp = self.root / f".{name}.tmp"
        final = self.root / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        return final

    def remove(self, path: Path) -> None:
        Path(path).unlink(missing_ok=True)
        _fsync_dir(self.root)

    def quarantine(self, path: Path) -> Path:
        dest = self.quarantine_dir / Path(path).name
        os.replace(path, dest)
        _fsync_dir(self.root)
        _fsync_dir(self.quarantine_dir)
        return dest

    # ------------------------------------------------------------------ reading
    def pending(self) -> list[Path]:
        """Complete spooled instances, oldest first."""
        return sorted(p for p in self.root.glob(f"*{SUFFIX}") if p.is_file())

    def recover(self) -> list[Path]:
        """After a crash: drop half-written temporary files (never acknowledged); return the pending instances."""
        for tmp in self.root.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        return self.pending()

    def depth(self) -> int:
        return sum(1 for _ in self.root.glob(f"*{SUFFIX}"))

    def quarantined(self) -> int:
        return sum(1 for _ in self.quarantine_dir.glob(f"*{SUFFIX}"))

    def oldest_age_seconds(self) -> float:
        """Age of the oldest pending instance (0 when the spool is empty); from its name, not mtime."""
        names = [p.name for p in self.root.glob(f"*{SUFFIX}")]
        if not names:
            return 0.0
        try:
            oldest_ns = int(min(names).split("-", 1)[0])
        except ValueError:
            return 0.0
        return max(0.0, time.time() - oldest_ns / 1e9)
