"""The champion holder: which model the API serves, and the atomic switch when the alias moves.

* At start a background thread loads the version the MLflow alias ``champion`` points to
  (``models.registry.load_clinical_model(version)``), warms it up (one forward on a blank image)
  and publishes it. ``/readyz`` is ready only once a champion is published.
* The same thread polls the alias every ``settings.champion_poll_seconds``. When it points to
  another version, that version is loaded and warmed up *beside* the current one, then published
  by swapping one reference under a lock. A request takes the reference once (``current()``) and
  uses that model until it answers, so in-flight requests finish with the model they started with
  and every response names the version that produced it. No request waits for a load.
* The models of the last few versions stay loaded (``keep``) so a heatmap for a prediction made
  by the previous champion is computed with that version.
* Inference is serialised per model (``model.lock``): torch already uses every core for one
  forward, and Grad-CAM's hooks must not see a concurrent forward.
* Every CPU forward and Grad-CAM of the process runs on one long-lived thread (``inference_thread``),
  and model loads on short-lived threads: torch's CPU kernels run on OpenMP, and libgomp keeps one
  thread pool per application thread that ever ran a parallel region, for as long as that thread
  lives. A second live pool, even an idle one, made every forward 1.5-2x slower on the 2-core host
  (``benchmarks/RESULTS.md``); FastAPI's request threads would each have grown one. The loaded
  versions share that thread, so a heatmap of an earlier version's prediction and a new prediction
  run one after the other (each already uses every core).

Serving verifies approval before it publishes (MLflow has no access control: anyone who can reach
it can move the alias or replace artefact files). For the version the alias names it asks
``compliance.approvals.serving_approval`` (a valid, unrevoked approval signature carrying the
artefact digest, and a governed alias move), then loads the artefact with that digest
(``models.registry.load_clinical_model(..., expected_sha256=...)``): files that hash differently are
never deserialised. When either check fails it keeps serving the last verified champion (or none:
``/readyz`` and predictions answer 503), records ``model.serving_refused`` in the audit trail once
per (version, reason), counts ``cxr_champion_verification_failures_total{reason}``, sets
``cxr_champion_alias_unverified`` to 1 (alert ``CXRChampionVerificationFailed``) and retries every
``retry_seconds``.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

log = logging.getLogger("cxr.api.model")
T = TypeVar("T")


class InferenceThread:
    """One long-lived thread that runs every CPU inference of the serving process.

    ``run(fn, ...)`` calls ``fn`` on that thread and returns its result (or raises its exception); a call
    made on the thread itself runs in place. Why one thread: libgomp gives each application thread that
    enters an OpenMP region a thread pool of its own, kept until that thread exits, and once two pools
    are alive the active one's forwards slow down (DenseNet-121, 224 px, on 2 cores: 85-120 ms with one
    pool, 150-220 ms with a second, idle pool). Requests arrive on many threads; their forwards all
    run here, so the process keeps a single pool.
    """

    def __init__(self, name: str = "cxr-inference") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self.ident: int | None = None

    def _remember(self) -> None:
        self.ident = threading.get_ident()

    def _forget_after_fork(self) -> None:
        # a forked child has no copy of the thread: it starts its own on first use
        self._lock = threading.Lock()
        self._executor, self.ident = None, None

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if threading.get_ident() == self.ident:
            return fn(*args, **kwargs)
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name,
                                                    initializer=self._remember)
            executor = self._executor
        return executor.submit(fn, *args, **kwargs).result()


inference_thread = InferenceThread()
os.register_at_fork(after_in_child=inference_thread._forget_after_fork)


def run_in_short_lived_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a new thread that exits when it returns, so that the OpenMP pool a model load
    may create (tensor copies run in parallel) dies with it and does not slow ``inference_thread``."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxr-model-load") as one_off:
        return one_off.submit(fn, *args).result()  # leaving the block joins the thread


def champion_version() -> str | None:
    """The version the registry alias ``champion`` points to now (None when unset)."""
    from mlflow.exceptions import MlflowException

    from models.registry import client, model_name

    try:
        return str(client().get_model_version_by_alias(model_name(), "champion").version)
    except MlflowException:
        return None


def inference_device() -> str:
    """``cuda`` when a GPU is present (and ``CXR_DEVICE`` does not say otherwise), else ``cpu``."""
    import os

    wanted = os.environ.get("CXR_DEVICE")
    if wanted:
        return wanted
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:
        return "cpu"


def _default_loader(version: str, expected_sha256: str | None = None):
    from models.registry import load_clinical_model

    return load_clinical_model(version, device=inference_device(), expected_sha256=expected_sha256)


def _default_verifier(version: str):
    from compliance.approvals import serving_approval

    return serving_approval(version)


class ChampionRefused(Exception):
    """The alias names a version that may not be served (``reason``: short code)."""

    def __init__(self, version: str, reason: str, message: str) -> None:
        self.version, self.reason = version, reason
        super().__init__(message)


class LoadedModel:
    """A published model plus the lock that serialises its inference."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.version = str(model.version)
        self.name = str(getattr(model, "name", "covid-cxr"))
        self.lock = threading.Lock()
        self.loaded_at = time.time()
        self.batcher = None
        try:  # GPU: requests arriving within a few ms run as one batch through captured CUDA graphs
            from models.batching import batching_enabled, make_batched_predictor

            if batching_enabled(model):  # CUDA only; the CPU path below is unchanged
                from core.config import get_settings

                s = get_settings()
                self.batcher = make_batched_predictor(model, window_ms=s.batch_window_ms,
                                                      max_batch=s.batch_max_size, lock=self.lock)
        except Exception as exc:  # noqa: BLE001 - batching is an optimisation: fall back to one at a time
            log.warning("micro-batching disabled for version %s (%s)", self.version, type(exc).__name__)
            self.batcher = None

    def predict(self, images, vitals):
        if self.batcher is not None and len(images) == 1:
            return [self.batcher((images[0], vitals[0]), timeout=60)]
        return inference_thread.run(self._predict, images, vitals)

    def _predict(self, images, vitals):
        with self.lock:
            return self.model.predict(images, vitals)

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()

    def gradcam(self, image, vitals):
        return inference_thread.run(self._gradcam, image, vitals)

    def _gradcam(self, image, vitals):
        with self.lock:
            return self.model.gradcam(image, vitals)


class ModelService:
    def __init__(self, *, poll_seconds: float = 5.0, loader: Callable[[str, str | None], Any] | None = None,
                 resolver: Callable[[], str | None] | None = None, keep: int = 3,
                 image_size: int = 256, verifier: Callable[[str], Any] | None = None,
                 retry_seconds: float | None = None) -> None:
        self.poll_seconds = poll_seconds
        self.retry_seconds = retry_seconds if retry_seconds is not None else max(3.0, 6 * poll_seconds)
        self._loader = loader or _default_loader
        self._resolver = resolver or champion_version
        self._verifier = verifier or _default_verifier
        self._refused: dict[str, tuple[str, float]] = {}  # version -> (reason, when)
        self.refusal: ChampionRefused | None = None  # why the alias's version is not served (None: it is)
        self._keep = keep
        self._image_size = image_size
        self._lock = threading.Lock()
        # one refresh at a time (the poll thread, /v1/model/refresh, tests): verification, the "audit a
        # refusal once per (version, reason)" rule and the switch are one unit
        self._refresh_lock = threading.Lock()
        self._current: LoadedModel | None = None
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self.switches = 0

    # ------------------------------------------------------------------ reading
    def current(self) -> LoadedModel | None:
        return self._current  # one atomic reference read

    @property
    def ready(self) -> bool:
        return self._current is not None

    def model_for_version(self, version: str) -> LoadedModel:
        """The loaded model of ``version`` (loading it if it was evicted: only a version that was signed,
        with the signed digest — e.g. for the heatmap of a prediction an earlier champion made)."""
        with self._lock:
            lm = self._loaded.get(str(version))
        if lm is not None:
            return lm
        approval = self._verifier(str(version))
        if not approval.artifact_sha256:
            raise ChampionRefused(str(version), approval.reason or "no-approval", approval.message)
        lm = LoadedModel(self._load_verified(str(version), approval.artifact_sha256))
        with self._lock:
            self._loaded[lm.version] = lm
            self._evict()
        return lm

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="champion-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.ready:
                return True
            time.sleep(0.05)
        return self.ready

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception as exc:  # keep serving the current champion; try again next poll
                self.last_error = f"{type(exc).__name__}"
                log.error("champion refresh failed: %s", type(exc).__name__)
            self._stop.wait(self.poll_seconds if self.ready else min(self.poll_seconds, 1.0))

    def _load_verified(self, version: str, digest: str):
        from models.serving import ArtifactDigestMismatch

        try:
            model = run_in_short_lived_thread(self._loader, version, digest)
        except ArtifactDigestMismatch as exc:
            raise ChampionRefused(version, "artifact-mismatch", str(exc)) from None
        if getattr(model, "artifact_sha256", None) != digest:  # whatever the loader, the files must be the signed ones
            raise ChampionRefused(version, "artifact-mismatch",
                                  f"version {version}: loaded artefact digest {getattr(model, 'artifact_sha256', None)} "
                                  f"is not the signed {digest}")
        return model

    def _verified(self, version: str) -> LoadedModel:
        """The version loaded and checked against its approval, or ``ChampionRefused``."""
        approval = self._verifier(version)
        if not approval.ok:
            raise ChampionRefused(version, approval.reason, approval.message)
        with self._lock:
            lm = self._loaded.get(version)
        if lm is not None and getattr(lm.model, "artifact_sha256", None) == approval.artifact_sha256:
            return lm
        t0 = time.perf_counter()
        lm = LoadedModel(self._load_verified(version, approval.artifact_sha256))
        self._warm_up(lm)
        log.info("loaded model version %s in %.1f s (artefact digest verified)", lm.version, time.perf_counter() - t0)
        return lm

    def _refuse(self, exc: ChampionRefused) -> None:
        """Keep the current champion; audit + count once per (version, reason); the gauge stays up."""
        from app import metrics

        first = self._refused.get(exc.version, ("", 0.0))[0] != exc.reason
        self._refused[exc.version] = (exc.reason, time.time())
        self.refusal = exc
        metrics.set_champion_unverified(True)
        if not first:
            return
        cur = self._current
        log.error("champion version %s NOT published (%s): %s; serving %s", exc.version, exc.reason, exc,
                  cur.version if cur else "nothing")
        metrics.record_champion_verification_failure(exc.reason)
        try:
            from compliance.audit import record_event
            from models.registry import model_name

            record_event("model.serving_refused", actor="cxr-api", role="service",
                         subject=f"model/{model_name()}/{exc.version}",
                         details={"model": model_name(), "version": exc.version, "reason": exc.reason,
                                  "message": str(exc)[:300], "served_version": cur.version if cur else None})
        except Exception as err:  # the refusal stands even if the trail cannot be written
            log.error("audit: model.serving_refused could not be recorded (%s)", type(err).__name__)

    def refresh(self) -> bool:
        """Verify, load and publish the alias's version if it differs from the current one. True if
        switched. A version that fails verification is not published (``self.refusal`` says why)."""
        with self._refresh_lock:
            return self._refresh()

    def _refresh(self) -> bool:
        from app import metrics

        version = self._resolver()
        cur = self._current
        if version is None or (cur is not None and cur.version == str(version)):
            self.refusal = None
            metrics.set_champion_unverified(False)
            return False
        version = str(version)
        refused = self._refused.get(version)
        if refused and time.time() - refused[1] < self.retry_seconds:
            return False
        try:
            lm = self._verified(version)
        except ChampionRefused as exc:
            self._refuse(exc)
            return False
        self._refused.pop(version, None)
        self.refusal = None
        metrics.set_champion_unverified(False)
        with self._lock:
            previous = self._current
            self._loaded[lm.version] = lm
            self._loaded.move_to_end(lm.version)
            self._current = lm  # the atomic switch
            self._evict()
            self.switches += 1
        self.last_error = None
        log.info("champion now version %s (was %s)", lm.version, previous.version if previous else None)
        try:
            from app import metrics

            metrics.set_model_info(lm.version, self._approved_at(lm.version), model_name=lm.name)
            metrics.configure_drift(getattr(lm.model, "reference", None), lm.version)
        except Exception as exc:  # metrics never stop a switch
            log.warning("metrics: model info / drift set-up failed (%s)", type(exc).__name__)
        return True


    def _evict(self) -> None:
        while len(self._loaded) > self._keep:
            oldest = next(iter(self._loaded))
            if self._current is not None and oldest == self._current.version:
                self._loaded.move_to_end(oldest)
                continue
            self._loaded.pop(oldest).close()

    @staticmethod
    def _approved_at(version: str):
        """Approval time of ``version`` from its e-signature records (None when unknown)."""
        try:
            from compliance.approvals import signatures

            times = [r.get("time_utc") for r in signatures(version) if r.get("action") in ("approve", "rollback")]
            times = [t for t in times if t]
            return max(times) if times else None
        except Exception:
            return None

    def _warm_up(self, lm: LoadedModel) -> None:
        import numpy as np

        blank = np.full((1, self._image_size, self._image_size), 0.5, dtype=np.float32)
        lm.predict([blank], [{}])
