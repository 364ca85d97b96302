"""The DICOM listener (pynetdicom): a PACS or modality C-STOREs studies here, results go back as SR +
secondary capture to the destination AE.

Flow per association:

1. C-ECHO is answered (Verification SCP).
2. Every storage SOP class is accepted (so a CT or an ultrasound a PACS routes here reaches the
   input gate and is *recorded* as refused, instead of failing the whole association), in every
   transfer syntax the decoder reads (:data:`TRANSFER_SYNTAXES`). Each C-STORE is written to the
   durable spool (``app.dicom.spool``: 0600, fsync) *before* Success is answered; a spool failure
   answers 0xA700 (out of resources) so the sender keeps the instance.
3. When the association is released (or aborted, or the connection drops) its instances form one
   batch, queued for the worker thread(s): each instance is analysed (``analyse(data, accession)``,
   the same input gate as the API), its result objects are built, and the batch's objects are
   C-STORE'd to the destination in one association with retry + backoff (``app.dicom.sender``).
4. A spooled instance is deleted only after its results were accepted by the PACS, or its refusal
   was recorded in the audit trail. A batch the PACS did not accept stays spooled and is queued
   again after ``requeue_delay`` (doubling up to 15 minutes); failures show in
   ``cxr_dicom_send_failures_total`` and ``cxr_dicom_spool_*`` (alert rules in prometheus/rules).
5. At start, the spool is recovered: instances received before a crash are processed first.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import uid as _uid

from app.dicom import metrics
from app.dicom.pipeline import InstanceOutcome, process_instance, record_sent
from app.dicom.sender import Destination, Sender, SendError
from app.dicom.spool import Spool
from app.dicom.types import Analyse

log = logging.getLogger("cxr.dicom.listener")

# Every transfer syntax models.preprocessing.decode_dicom reads (pydicom + pylibjpeg + python-gdcm + pyjpegls).
TRANSFER_SYNTAXES = [
    _uid.ExplicitVRLittleEndian, _uid.ImplicitVRLittleEndian, _uid.DeflatedExplicitVRLittleEndian,
    _uid.ExplicitVRBigEndian, _uid.JPEGBaseline8Bit, _uid.JPEGExtended12Bit, _uid.JPEGLossless,
    _uid.JPEGLosslessSV1, _uid.JPEGLSLossless, _uid.JPEGLSNearLossless, _uid.JPEG2000Lossless, _uid.JPEG2000,
    _uid.HTJ2KLossless, _uid.HTJ2KLosslessRPCL, _uid.HTJ2K, _uid.RLELossless,
]
CHEST_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR",
    "1.2.840.10008.5.1.4.1.1.1.1": "DX for presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX for processing",
}
MAX_REQUEUE_DELAY = 900.0


@dataclass
class Batch:
    items: list[Path]
    released_at: float = field(default_factory=time.time)
    attempt: int = 0
    source: str = "association"


class DicomListener:
    def __init__(self, *, analyse: Analyse, spool_dir: str | Path, destination: Destination | None,
                 ae_title: str = "CXR-AI", host: str = "127.0.0.1", port: int = 11112, workers: int = 1,
                 send_attempts: int = 5, send_backoff: float = 0.5, requeue_delay: float = 30.0,
                 batch_size: int = 50) -> None:
        self.analyse = analyse
        self.spool = Spool(spool_dir)
        self.destination = destination
        self.ae_title = ae_title
        self.host, self.port = host, int(port)
        self.workers = max(1, workers)
        self.requeue_delay = requeue_delay
        self.batch_size = max(1, batch_size)
        self.actor = f"dicom-listener:{ae_title}"
        self._stop = threading.Event()
        self.sender = (Sender(destination, calling_ae=ae_title, attempts=send_attempts, backoff=send_backoff,
                              stop=self._stop) if destination is not None else None)
        self._queue: queue.Queue[Batch | None] = queue.Queue()
        self._open: dict[int, list[Path]] = {}
        self._open_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._timers: list[threading.Timer] = []
        self._server = None
        self._busy = 0
        self._busy_lock = threading.Lock()
        metrics.bind_spool(self.spool.depth, self.spool.oldest_age_seconds, self.spool.quarantined)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "DicomListener":
        from pynetdicom import AE, evt
        from pynetdicom.presentation import AllStoragePresentationContexts
        from pynetdicom.sop_class import Verification

        recovered = self.spool.recover()
        if recovered:
            log.info("spool: %d instance(s) received before the last stop are processed first", len(recovered))
            self._enqueue(recovered, source="recovered")
        for i in range(self.workers):
            t = threading.Thread(target=self._work, name=f"dicom-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = 16
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        handlers = [(evt.EVT_C_ECHO, self._on_echo), (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_RELEASED, self._on_end), (evt.EVT_ABORTED, self._on_end),
                    (evt.EVT_CONN_CLOSE, self._on_end)]
        self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        self.port = self._server.server_address[1]
        log.info("DICOM listener %s on %s:%d; results to %s", self.ae_title, self.host, self.port,
                 self.destination or "(no destination: results are not sent)")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._stop.set()
        for t in self._timers:
            t.cancel()
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=timeout)
        self._threads.clear()
        # the analysis's champion holder (``make_analyse``) polls the registry in its own thread: it stops
        # with the listener, or it would go on verifying (and auditing) for a listener that is gone
        service = getattr(self.analyse, "service", None)
        if service is not None and callable(getattr(service, "stop", None)):
            service.stop()

    def serve_forever(self) -> None:
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()

    def idle(self) -> bool:
        """No queued or running batch and no open association holding instances."""
        with self._busy_lock, self._open_lock:
            return self._queue.empty() and self._busy == 0 and not self._open

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.idle():
                return True
            time.sleep(0.05)
        return self.idle()

    # ------------------------------------------------------------------ pynetdicom handlers
    def _on_echo(self, event) -> int:
        return 0x0000

    def _on_store(self, event) -> int:
        try:
            data = event.encoded_dataset(include_meta=True)
            path = self.spool.put(data)
        except Exception as exc:  # noqa: BLE001 - never acknowledge what is not on disk
            log.error("spool write failed (%s): answering 0xA700, the sender keeps the instance", type(exc).__name__)
            return 0xA700
        with self._open_lock:
            self._open.setdefault(id(event.assoc), []).append(path)
        metrics.RECEIVED.inc()
        return 0x0000

    def _on_end(self, event) -> None:
        with self._open_lock:
            items = self._open.pop(id(event.assoc), None)
        if items:
            calling = getattr(getattr(event.assoc, "requestor", None), "ae_title", "?")
            log.info("association from %s ended: %d instance(s) queued for analysis", calling, len(items))
            self._enqueue(items)

    # ------------------------------------------------------------------ work
    def _enqueue(self, items: list[Path], *, source: str = "association", released_at: float | None = None) -> None:
        at = time.time() if released_at is None else released_at
        for i in range(0, len(items), self.batch_size):
            self._queue.put(Batch(items[i:i + self.batch_size], released_at=at, source=source))

    def _work(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            with self._busy_lock:
                self._busy += 1
            try:
                self.process_batch(batch)
            except Exception as exc:  # noqa: BLE001 - keep the worker alive; items stay spooled
                log.exception("batch processing failed (%s); its instances stay spooled", type(exc).__name__)
                self._requeue(batch)
            finally:
                with self._busy_lock:
                    self._busy -= 1

    def process_batch(self, batch: Batch) -> None:
        to_send: list[tuple[Path, InstanceOutcome]] = []
        for path in batch.items:
            if self._stop.is_set():
                return  # unprocessed items stay spooled for the next start
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue  # already handled (e.g. by an earlier attempt of this batch)
            outcome = process_instance(data, self.analyse, actor=self.actor, via="dicom")
            del data
            if outcome.status == "refused":
                self.spool.remove(path)  # the refusal is in the audit trail
            elif outcome.status == "error":
                self.spool.quarantine(path)
            else:
                to_send.append((path, outcome))
        if not to_send:
            return
        if self.sender is None:
            log.warning("no destination configured: %d result set(s) not sent; instances stay spooled", len(to_send))
            return
        datasets = [ds for _, o in to_send for ds in o.objects.datasets()]
        try:
            self.sender.send(datasets)
        except SendError as exc:
            metrics.SEND_FAILURES.inc()
            log.error("%s; %d instance(s) stay spooled", exc, len(to_send))
            self._requeue(Batch([p for p, _ in to_send], released_at=batch.released_at, attempt=batch.attempt,
                                source=batch.source))
            return
        elapsed = time.time() - batch.released_at
        for path, outcome in to_send:
            record_sent(outcome, actor=self.actor, destination=str(self.destination), via="dicom")
            self.spool.remove(path)
            metrics.SENT.labels("sr").inc()
            metrics.SENT.labels("sc").inc()
            metrics.ROUNDTRIP.observe(elapsed)
        log.info("results of %d instance(s) accepted by %s", len(to_send), self.destination)

    def _requeue(self, batch: Batch) -> None:
        if self._stop.is_set():
            return
        delay = min(MAX_REQUEUE_DELAY, self.requeue_delay * 2 ** batch.attempt)
        batch.attempt += 1
        timer = threading.Timer(delay, lambda: self._queue.put(batch))
        timer.daemon = True
        self._timers = [t for t in self._timers if t.is_alive()] + [timer]
        timer.start()
