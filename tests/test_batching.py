"""models.batching: the micro-batcher on CPU (batches, routing, errors, timeouts, close) and the
CUDA-graph predictor (GPU only; skipped cleanly without CUDA)."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from models.batching import BatcherClosed, CudaGraphPredictor, MicroBatcher, make_batched_predictor


class Recorder:
    """A real batch function: multiplies by 10, records every batch it saw."""

    def __init__(self, delay: float = 0.0):
        self.batches: list[list[int]] = []
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, items: list[int]) -> list[int]:
        with self.lock:
            self.batches.append(list(items))
        if self.delay:
            time.sleep(self.delay)
        if any(i < 0 for i in items):
            raise ValueError(f"negative item in batch of {len(items)}")
        return [i * 10 for i in items]


def test_items_within_the_window_form_one_batch_and_results_go_to_their_callers():
    fn = Recorder()
    with MicroBatcher(fn, window_ms=300, max_batch=8) as b:
        futures = [b.submit(i) for i in range(8)]
        assert [f.result(timeout=5) for f in futures] == [i * 10 for i in range(8)]
    assert fn.batches == [list(range(8))]
    assert b.stats["batches"] == 1 and b.stats["largest"] == 8


def test_max_batch_splits_and_order_is_kept():
    fn = Recorder()
    with MicroBatcher(fn, window_ms=200, max_batch=4) as b:
        futures = [b.submit(i) for i in range(10)]
        assert [f.result(timeout=5) for f in futures] == [i * 10 for i in range(10)]
    assert [len(x) for x in fn.batches] == [4, 4, 2]
    assert sum(fn.batches, []) == list(range(10))


def test_concurrent_callers_each_get_their_own_result():
    fn = Recorder(delay=0.01)
    with MicroBatcher(fn, window_ms=20, max_batch=6) as b:
        with ThreadPoolExecutor(max_workers=12) as pool:
            got = list(pool.map(lambda i: (i, b(i, timeout=10)), range(60)))
    assert all(r == i * 10 for i, r in got)
    assert sum(len(x) for x in fn.batches) == 60
    assert max(len(x) for x in fn.batches) > 1  # concurrent requests really were batched


def test_zero_window_runs_sequential_calls_alone():
    fn = Recorder()
    with MicroBatcher(fn, window_ms=0, max_batch=16) as b:
        assert [b(i, timeout=5) for i in range(3)] == [0, 10, 20]
    assert fn.batches == [[0], [1], [2]]


def test_an_error_reaches_every_caller_of_its_batch_only():
    fn = Recorder()
    with MicroBatcher(fn, window_ms=200, max_batch=3) as b:
        bad = [b.submit(i) for i in (1, -2, 3)]
        good = [b.submit(i) for i in (4, 5)]
        for f in bad:
            with pytest.raises(ValueError, match="negative item"):
                f.result(timeout=5)
        assert [f.result(timeout=5) for f in good] == [40, 50]


def test_wrong_number_of_results_is_an_error():
    with MicroBatcher(lambda items: items[:-1], window_ms=100, max_batch=2) as b:
        futures = [b.submit(i) for i in range(2)]
        for f in futures:
            with pytest.raises(RuntimeError, match="1 results for 2 items"):
                f.result(timeout=5)


def test_timeout_and_cancelled_items_are_skipped():
    fn = Recorder(delay=0.4)
    with MicroBatcher(fn, window_ms=0, max_batch=1) as b:
        first = b.submit(1)  # occupies the worker for 0.4 s
        time.sleep(0.05)
        with pytest.raises(TimeoutError):
            b(2, timeout=0.05)  # still queued when the caller gives up: cancelled
        assert first.result(timeout=5) == 10
        assert b(3, timeout=5) == 30
    assert [1] in fn.batches and [3] in fn.batches and [2] not in fn.batches


def test_close_drains_the_queue_then_refuses():
    fn = Recorder(delay=0.05)
    b = MicroBatcher(fn, window_ms=0, max_batch=2)
    futures = [b.submit(i) for i in range(5)]
    b.close()
    assert [f.result(timeout=1) for f in futures] == [0, 10, 20, 30, 40]
    with pytest.raises(BatcherClosed):
        b.submit(9)


def test_arguments_are_checked():
    with pytest.raises(ValueError):
        MicroBatcher(Recorder(), max_batch=0)
    with pytest.raises(ValueError):
        MicroBatcher(Recorder(), window_ms=-1)


def _small_model(device: str = "cpu"):
    import pandas as pd
    import torch

    from models.network import FusionNet
    from models.serving import ClinicalModel
    from models.transforms import VITAL_FIELDS, VitalsEncoder

    torch.manual_seed(0)
    net = FusionNet(encoder="small", image_size=64, n_vitals_features=16).eval().to(device)
    enc = VitalsEncoder.fit(pd.DataFrame({f: [1.0, 3.0] for f in VITAL_FIELDS} | {"sex": ["M", "F"]}))
    config = {"classes": ["covid19", "other_pneumonia", "normal"], "operating_threshold": 0.5, "temperature": 1.0,
              "network": net.config(), "vitals_encoder": enc.to_dict()}
    return ClinicalModel(net, config, device=device)


def _inputs(n: int):
    rng = np.random.default_rng(1)
    images = [rng.random((1, 256, 256), dtype=np.float32) for _ in range(n)]
    vitals = [{"spo2_percent": 90.0 + i, "temperature_c": 37.0 + 0.1 * i} for i in range(n)]
    return images, vitals


def test_make_batched_predictor_on_cpu_keeps_one_request_per_batch():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CPU behaviour check; this machine has CUDA")
    model = _small_model()
    images, vitals = _inputs(3)
    expected = model.predict(images, vitals)
    with make_batched_predictor(model, window_ms=50, max_batch=8) as b:
        assert b.max_batch == 1 and b.window_s == 0.0  # no batching without a GPU: unchanged behaviour
        with ThreadPoolExecutor(max_workers=3) as pool:
            got = list(pool.map(lambda i: b((images[i], vitals[i]), timeout=60), range(3)))
    for g, e in zip(got, expected):
        assert g["p_covid19"] == pytest.approx(e["p_covid19"], abs=1e-6)
        assert g["decision"] == e["decision"]


def test_cuda_graph_predictor_refuses_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="CUDA"):
        CudaGraphPredictor(_small_model())


@pytest.mark.gpu
def test_cuda_graph_predictor_matches_eager_predict_and_batches():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = _small_model("cuda")
    images, vitals = _inputs(11)
    expected = model.predict(images, vitals)
    runner = CudaGraphPredictor(model, batch_sizes=(1, 2, 4, 8))
    got = runner.predict(images, vitals)  # 11 -> batches of 8 and 3 (padded to 4)
    for g, e in zip(got, expected):
        assert g["p_covid19"] == pytest.approx(e["p_covid19"], abs=1e-4)
    with make_batched_predictor(model, window_ms=50, max_batch=8) as b:
        with ThreadPoolExecutor(max_workers=11) as pool:
            res = list(pool.map(lambda i: b((images[i], vitals[i]), timeout=60), range(11)))
        assert b.stats["largest"] > 1
    for g, e in zip(res, expected):
        assert g["p_covid19"] == pytest.approx(e["p_covid19"], abs=1e-4)
