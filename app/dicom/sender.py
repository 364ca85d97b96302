"""C-STORE of result objects to the hospital's PACS, with retry and exponential backoff.

``Destination.parse("PACS@10.0.0.5:104")`` names the PACS (called AE title, host, port).
:meth:`Sender.send` opens one association, stores every dataset and releases; a refused
association, a network error or a non-success C-STORE status is a failed attempt, retried after
``backoff * 2**attempt`` seconds (capped at ``max_backoff``) up to ``attempts`` times, then
:class:`SendError`. Warning statuses (0xB000, 0xB006, 0xB007: stored with coercion) count as stored.
A resend is idempotent: the result objects have deterministic UIDs (``app.dicom.results``).
"""
from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from typing import Sequence

from pydicom.dataset import Dataset

from app.dicom import metrics

log = logging.getLogger("cxr.dicom.sender")
_DEST = re.compile(r"^(?P<aet>[^@\\]{1,16})@(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})$")
SUCCESS_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}


class SendError(RuntimeError):
    pass


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Destination":
        m = _DEST.match(text.strip())
        if not m or not (0 < int(m["port"]) < 65536) or not m["aet"].strip():
            raise ValueError(f"destination {text!r}: expected AE_TITLE@HOST:PORT, e.g. PACS@10.0.0.5:104 "
                             "(AE title 1-16 characters, port 1-65535)")
        return cls(m["aet"].strip(), m["host"].strip("[]"), int(m["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class Sender:
    def __init__(self, destination: Destination, *, calling_ae: str = "CXR-AI", attempts: int = 5,
                 backoff: float = 0.5, max_backoff: float = 30.0, timeout: float = 30.0,
                 stop: threading.Event | None = None) -> None:
        self.destination = destination
        self.calling_ae = calling_ae
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self._stop = stop or threading.Event()

    def send(self, datasets: Sequence[Dataset]) -> None:
        """Store every dataset at the destination (all or raise :class:`SendError`)."""
        if not datasets:
            return
        last: Exception | None = None
        for attempt in range(self.attempts):
            try:
                self._send_once(datasets)
                return
            except SendError as exc:
                last = exc
                if attempt + 1 < self.attempts:
                    metrics.RETRIES.inc()
                    delay = min(self.max_backoff, self.backoff * 2 ** attempt)
                    log.warning("sending to %s failed (%s); retry %d/%d in %.1f s", self.destination, exc,
                                attempt + 1, self.attempts - 1, delay)
                    if self._stop.wait(delay):
                        break
        raise SendError(f"results not delivered to {self.destination} after {self.attempts} attempts: {last}")

    def _send_once(self, datasets: Sequence[Dataset]) -> None:
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        contexts = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets})
        for sop_class, ts in contexts:
            ae.add_requested_context(sop_class, [ts])
        try:
            assoc = ae.associate(self.destination.host, self.destination.port, ae_title=self.destination.ae_title)
        except (OSError, ValueError) as exc:
            raise SendError(f"cannot connect: {type(exc).__name__}") from None
        if not assoc.is_established:
            raise SendError("association rejected or aborted" if (assoc.is_rejected or assoc.is_aborted)
                            else "association not established")
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                if code is None:
                    raise SendError("no C-STORE response (connection lost or timed out)")
                if int(code) not in SUCCESS_STATUSES:
                    raise SendError(f"C-STORE status 0x{int(code):04X}")
        finally:
            if assoc.is_established:
                assoc.release()
            else:
                assoc.abort()
