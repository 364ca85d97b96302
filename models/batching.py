"""Micro-batching of model calls (issue #18 part 5): requests that arrive within a few milliseconds
are run as one batch; on CUDA the network runs through captured CUDA graphs of static batch shapes.

Two pieces, usable separately:

- ``MicroBatcher(fn, window_ms=3, max_batch=16)``: a thread-safe queue + one worker thread. Callers
  ``submit(item) -> Future`` (or ``batcher(item, timeout=...)`` to wait). The worker takes the first
  waiting item, keeps collecting until ``window_ms`` has passed since that item arrived or
  ``max_batch`` items are in hand, calls ``fn(items) -> results`` (one result per item, same order)
  and routes each result (or ``fn``'s exception) to its own caller's future. Pure Python, works on
  CPU; no torch import. Items whose caller cancelled the future are skipped.
- ``CudaGraphPredictor(model, batch_sizes=(1, 2, 4, 8, 16))``: for a ``models.serving.ClinicalModel``
  on a CUDA device, captures one CUDA graph of ``net.embed`` + ``net.head`` per static batch size at
  construction (warm-up included); ``predict(images, vitals)`` pads the batch up to the next captured
  size, copies into the static input tensors, replays, and post-processes exactly like
  ``ClinicalModel.predict`` (temperature, threshold, OOD score). Raises ``RuntimeError`` without CUDA.
- ``make_batched_predictor(model, window_ms, max_batch)``: the function the API should call:
  returns a ``MicroBatcher`` over ``(image, vitals)`` pairs whose batch function is the CUDA-graph
  predictor when ``torch.cuda.is_available()`` and the model is on CUDA, else ``model.predict``
  (on CPU, ``max_batch=1`` keeps today's behaviour: see ``batching_enabled``).

The model library takes its settings as arguments (``window_ms``, ``max_batch``); the app reads
``Settings.batch_window_ms`` / ``batch_max_size`` and passes them.

Wiring (as done in ``app.services.champion.LoadedModel``):

    # LoadedModel.__init__(self, model, settings=None):
    from models.batching import batching_enabled, make_batched_predictor
    self.batcher = None
    if batching_enabled(model):  # CUDA only; CPU keeps the locked single-request path
        s = settings or get_settings()
        self.batcher = make_batched_predictor(model, window_ms=s.batch_window_ms,
                                              max_batch=s.batch_max_size, lock=self.lock)
    # LoadedModel.predict(self, images, vitals):
    if self.batcher is not None and len(images) == 1:
        return [self.batcher((images[0], vitals[0]), timeout=60)]
    with self.lock: return self.model.predict(images, vitals)
    # ModelService._evict: call lm.batcher.close() for an evicted LoadedModel with a batcher.

Graphs are captured in ``make_batched_predictor`` (so at load, before ``_warm_up``); the warm-up
request then goes through the batcher too.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

import numpy as np

__all__ = ["MicroBatcher", "BatcherClosed", "CudaGraphPredictor", "make_batched_predictor", "batching_enabled"]

log = logging.getLogger("cxr.batching")

T = TypeVar("T")
R = TypeVar("R")


class BatcherClosed(RuntimeError):
    """The batcher was closed: no new items are accepted."""


class MicroBatcher(Generic[T, R]):
    """Collect items arriving within ``window_ms`` (up to ``max_batch``) into one ``fn(items)`` call.

    ``fn``: ``list[T] -> Sequence[R]`` with exactly one result per item, in order; an exception (or a
    wrong number of results) is set on every future of that batch. ``window_ms`` ≥ 0: how long the
    first item of a batch waits for company (0 = take only what is already queued). ``max_batch`` ≥ 1.
    ``max_queue``: items waiting beyond which ``submit`` raises ``queue.Full``-like ``RuntimeError``
    (0 = unbounded). ``stats``: batches run, items run, largest batch, histogram of batch sizes.
    Thread-safe; one worker thread (daemon) per batcher; ``close()`` drains what is queued.
    """

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], *, window_ms: float = 3.0, max_batch: int = 16,
                 max_queue: int = 0, name: str = "micro-batcher"):
        if max_batch < 1:
            raise ValueError(f"max_batch must be ≥ 1, got {max_batch}")
        if window_ms < 0:
            raise ValueError(f"window_ms must be ≥ 0, got {window_ms}")
        self.fn = fn
        self.window_s = float(window_ms) / 1000.0
        self.max_batch = int(max_batch)
        self.max_queue = int(max_queue)
        self._queue: deque[tuple[T, Future, float]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.stats: dict[str, Any] = {"batches": 0, "items": 0, "largest": 0, "sizes": {}}
        self._worker = threading.Thread(target=self._run, name=name, daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ callers
    def submit(self, item: T) -> "Future[R]":
        """Queue one item; its ``Future`` resolves to ``fn``'s result for it (or ``fn``'s exception)."""
        fut: Future = Future()
        with self._cond:
            if self._closed:
                raise BatcherClosed("the batcher is closed")
            if self.max_queue and len(self._queue) >= self.max_queue:
                raise RuntimeError(f"batcher queue full ({self.max_queue} items waiting)")
            self._queue.append((item, fut, time.monotonic()))
            self._cond.notify()
        return fut

    def __call__(self, item: T, timeout: float | None = None) -> R:
        """Submit and wait: the result, or ``fn``'s exception; ``TimeoutError`` after ``timeout`` s
        (the item is then cancelled if it has not started)."""
        fut = self.submit(item)
        try:
            return fut.result(timeout=timeout)
        except TimeoutError:
            fut.cancel()
            raise

    def close(self, wait: bool = True, timeout: float | None = 10.0) -> None:
        """Stop accepting items; the worker runs what is queued, then exits."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if wait:
            self._worker.join(timeout)

    def __enter__(self) -> "MicroBatcher[T, R]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ worker
    def _take_batch(self) -> list[tuple[T, Future, float]] | None:
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = self._queue[0][2] + self.window_s
            while len(self._queue) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            n = min(self.max_batch, len(self._queue))
            return [self._queue.popleft() for _ in range(n)]

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            live = [(item, fut) for item, fut, _ in batch if fut.set_running_or_notify_cancel()]
            if not live:
                continue
            items = [item for item, _ in live]
            try:
                results = list(self.fn(items))
                if len(results) != len(items):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
            except BaseException as exc:  # noqa: BLE001 - every caller of the batch gets the error
                for _, fut in live:
                    fut.set_exception(exc)
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                continue
            for (_, fut), res in zip(live, results):
                fut.set_result(res)
            n = len(items)
            self.stats["batches"] += 1
            self.stats["items"] += n
            self.stats["largest"] = max(self.stats["largest"], n)
            self.stats["sizes"][n] = self.stats["sizes"].get(n, 0) + 1


# ---------------------------------------------------------------------------------------- CUDA
class CudaGraphPredictor:
    """``ClinicalModel.predict`` through CUDA graphs of static batch shapes (CUDA only).

    ``model``: a ``models.serving.ClinicalModel`` whose ``device`` is CUDA. ``batch_sizes``: the
    static shapes captured (a batch of n runs in the smallest captured size ≥ n, zero-padded; larger
    batches are split). Inputs per item: image (1, S, S) or (S, S) float in [0, 1] as
    ``prepare_image`` returns, vitals dict. Capture happens in ``__init__`` after 3 warm-up passes
    on a side stream (as ``torch.cuda.graphs`` requires); the model's weights must not be replaced
    afterwards (build a new predictor for a new model version).
    """

    def __init__(self, model, batch_sizes: Sequence[int] = (1, 2, 4, 8, 16)):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("CudaGraphPredictor needs CUDA (torch.cuda.is_available() is False)")
        if not str(model.device).startswith("cuda"):
            raise RuntimeError(f"the model is on {model.device}; load it with device='cuda'")
        self.model = model
        self.sizes = sorted({int(b) for b in batch_sizes if int(b) >= 1})
        if not self.sizes:
            raise ValueError("batch_sizes must hold at least one size ≥ 1")
        self._lock = threading.Lock()
        self._graphs: dict[int, tuple[Any, Any, Any, Any, Any]] = {}
        net, dev = model.net, torch.device(model.device)
        s = model.image_size
        n_vit = model.vitals_encoder.n_features
        with torch.inference_mode(False), torch.no_grad():
            for b in self.sizes:
                img = torch.zeros((b, 1, s, s), device=dev) if "image" in model.modalities else None
                vit = torch.zeros((b, n_vit), device=dev)
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(3):
                        net.head(net.embed(img, vit))
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    emb = net.embed(img, vit)
                    logits = net.head(emb)
                self._graphs[b] = (graph, img, vit, emb, logits)
        torch.cuda.synchronize()

    def _bucket(self, n: int) -> int:
        for b in self.sizes:
            if b >= n:
                return b
        return self.sizes[-1]

    def _run(self, images, vitals) -> tuple[np.ndarray, np.ndarray]:
        import torch

        img_t, vit_t = self.model._tensors(images, vitals)  # same resize/encoding as ClinicalModel
        n = vit_t.shape[0]
        b = self._bucket(n)
        graph, s_img, s_vit, s_emb, s_logits = self._graphs[b]
        with self._lock, torch.no_grad():
            if s_img is not None:
                s_img.zero_()
                s_img[:n].copy_(img_t)
            s_vit.zero_()
            s_vit[:n].copy_(vit_t)
            graph.replay()
            logits = s_logits[:n].float().cpu().numpy().astype(np.float64)
            emb = s_emb[:n].float().cpu().numpy().astype(np.float64)
        return logits, emb

    def predict(self, images: Sequence[np.ndarray] | None, vitals: Sequence[dict | None]) -> list[dict]:
        """Same output as ``ClinicalModel.predict`` (probabilities, p_covid19, decision, ood_score, ood)."""
        from models.evaluate import softmax

        m = self.model
        vitals = list(vitals) if vitals is not None else [None] * len(images or [])
        out: list[dict] = []
        ood_thr = (m.reference.get("ood") or {}).get("threshold")
        step = self.sizes[-1]
        for i in range(0, len(vitals), step):
            logits, emb = self._run(None if images is None else images[i:i + step], vitals[i:i + step])
            probs = softmax(logits, m.temperature)
            for p, o in zip(probs, m._ood(emb)):
                pc = float(p[0])
                out.append({"probabilities": {c: float(p[j]) for j, c in enumerate(m.classes)}, "p_covid19": pc,
                            "decision": "covid19-positive" if pc >= m.operating_threshold else "covid19-negative",
                            "ood_score": float(o), "ood": bool(ood_thr is not None and o > ood_thr)})
        return out


def batching_enabled(model) -> bool:
    """True when micro-batching pays: CUDA present and the model on a CUDA device."""
    try:
        import torch

        return bool(torch.cuda.is_available() and str(getattr(model, "device", "cpu")).startswith("cuda"))
    except Exception:  # noqa: BLE001
        return False


def make_batched_predictor(model, *, window_ms: float = 3.0, max_batch: int = 16,
                           use_cuda_graphs: bool = True, lock: "threading.Lock | None" = None) -> MicroBatcher:
    """A ``MicroBatcher`` over ``(image, vitals)`` pairs → one ``predict`` result dict each.

    On CUDA (``batching_enabled(model)``): batches of up to ``max_batch`` collected for ``window_ms``
    and run through a ``CudaGraphPredictor`` (captured now, at load; ``use_cuda_graphs=False`` →
    plain ``model.predict`` on the GPU). Without CUDA: ``window_ms=0, max_batch=1`` and
    ``model.predict`` — each request runs alone, as today. ``lock``: held around each batch (pass the
    lock that already serialises this model's inference, e.g. ``LoadedModel.lock``, so Grad-CAM and
    batches never interleave). Call ``close()`` when the model is evicted.
    """
    if batching_enabled(model):
        runner = CudaGraphPredictor(model, _pow2_sizes(max_batch)) if use_cuda_graphs else model
        predict = runner.predict
    else:
        predict, window_ms, max_batch = model.predict, 0.0, 1

    def run(pairs: list[tuple[np.ndarray, dict | None]]) -> list[dict]:
        if lock is None:
            return predict([p[0] for p in pairs], [p[1] for p in pairs])
        with lock:
            return predict([p[0] for p in pairs], [p[1] for p in pairs])

    return MicroBatcher(run, window_ms=window_ms, max_batch=max_batch, name=f"batcher-{getattr(model, 'version', '')}")


def _pow2_sizes(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [int(max_batch)]
