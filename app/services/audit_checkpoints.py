"""The API's periodic audit checkpoint: every ``settings.audit_checkpoint_seconds`` (and at shut-down)
the head of the audit trail (seq, hash) is appended to the checkpoint file outside the database
(``compliance.audit.checkpoint``) when it moved since the last one. Governance actions checkpoint
themselves; this covers the high-volume entries (``prediction.served``, ``outcome.recorded``)."""
from __future__ import annotations

import logging
import threading

log = logging.getLogger("cxr.api.audit")


class AuditCheckpointer:
    def __init__(self, interval_seconds: float) -> None:
        self.interval = max(1.0, float(interval_seconds))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: tuple[int, str] | None = None  # the head this checkpointer last wrote

    def tick(self, reason: str = "periodic") -> None:
        from compliance.audit import head
        from compliance.audit_anchor import write_checkpoint

        try:
            seq, h = head()
            if seq and (seq, h) != self._last:
                write_checkpoint(seq, h, reason=reason)
                self._last = (seq, h)
        except Exception as exc:  # never stops the API; a missing checkpoint shows at verification
            log.error("audit checkpoint failed: %s", type(exc).__name__)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.tick()

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="audit-checkpointer", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.tick("shutdown")
