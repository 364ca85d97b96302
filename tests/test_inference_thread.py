"""app.services.champion: every CPU forward and Grad-CAM of the serving process runs on one thread,
and model loads on threads that exit, so that torch's OpenMP keeps a single thread pool.

Why it matters (measured, benchmarks/RESULTS.md): libgomp keeps a pool per application thread that
ever ran a parallel region; with a second live pool a DenseNet-121 forward in the API took 174 ms
p50 instead of 82 ms on the 2-core host. The subprocess test checks the pools themselves (OS threads)
with real torch kernels; the others check the routing with recording models.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
from api_fixtures import REPO

from app.services.champion import LoadedModel, ModelService, inference_thread, run_in_short_lived_thread


class RecordingModel:
    """Records the thread of every predict / gradcam; ``fail`` makes predict raise."""

    version = "7"
    name = "covid-cxr"
    artifact_sha256 = "d" * 64

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.threads: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def _record(self, what: str) -> None:
        with self.lock:
            self.threads.append((what, threading.get_ident()))

    def predict(self, images, vitals):
        self._record("predict")
        if self.fail:
            raise ValueError("the model refused this input")
        return [{"p_covid19": float(np.mean(im))} for im in images]

    def gradcam(self, image, vitals):
        self._record("gradcam")
        return np.zeros(np.asarray(image).shape[-2:], dtype=np.float32)


def test_forwards_and_gradcams_from_many_request_threads_all_run_on_the_one_inference_thread():
    model = RecordingModel()
    lm = LoadedModel(model)
    image = np.full((1, 8, 8), 0.25, dtype=np.float32)

    def request(i: int):
        out = lm.predict([image * (i + 1)], [{}])[0]
        lm.gradcam(image, {})
        return out["p_covid19"], threading.get_ident()

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(request, range(12)))
    assert [p for p, _ in results] == pytest.approx([0.25 * (i + 1) for i in range(12)])  # each caller its own result
    callers = {t for _, t in results}
    ran_on = {t for _, t in model.threads}
    assert len(model.threads) == 24
    assert ran_on == {inference_thread.ident}, "every forward and Grad-CAM must run on the one inference thread"
    assert not ran_on & callers and threading.get_ident() not in ran_on


def test_an_inference_error_reaches_its_caller_and_the_thread_serves_on():
    failing, working = LoadedModel(RecordingModel(fail=True)), LoadedModel(RecordingModel())
    with pytest.raises(ValueError, match="refused this input"):
        failing.predict([np.zeros((1, 4, 4), np.float32)], [{}])
    assert working.predict([np.ones((1, 4, 4), np.float32)], [{}])[0]["p_covid19"] == 1.0


def test_a_call_made_on_the_inference_thread_runs_in_place_instead_of_deadlocking():
    lm = LoadedModel(RecordingModel())
    nested = inference_thread.run(lambda: lm.predict([np.ones((1, 2, 2), np.float32)], [{}]))
    assert nested[0]["p_covid19"] == 1.0


def test_a_model_load_runs_on_a_thread_that_has_exited_when_the_model_is_published():
    seen: dict[str, threading.Thread] = {}
    model = RecordingModel()

    def loader(version, digest):
        seen["load"] = threading.current_thread()
        return model

    approval = SimpleNamespace(ok=True, reason=None, message="", artifact_sha256=model.artifact_sha256)
    svc = ModelService(poll_seconds=3600, loader=loader, resolver=lambda: "7", verifier=lambda v: approval,
                       image_size=16)
    assert svc.refresh() and svc.current().version == "7"
    load_thread = seen["load"]
    assert load_thread is not threading.current_thread() and not load_thread.is_alive()
    # the warm-up forward ran on the inference thread, not on the loading thread
    assert model.threads == [("predict", inference_thread.ident)]


def test_run_in_short_lived_thread_returns_the_value_and_reraises_the_error():
    assert run_in_short_lived_thread(lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(KeyError):
        run_in_short_lived_thread(lambda: {}["missing"])


_POOL_PROBE = textwrap.dedent("""
    import json, os, sys, threading
    sys.path.insert(0, sys.argv[1])
    import torch
    from app.services.champion import LoadedModel

    class ConvModel:  # real torch kernels: conv + elementwise ops large enough to run in parallel
        version, name = "1", "covid-cxr"
        def __init__(self):
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU()).eval()
        def predict(self, images, vitals):
            with torch.no_grad():
                x = torch.from_numpy(images[0]).unsqueeze(0)
                return [{"p_covid19": float(torch.sigmoid(self.net(x).mean()))}]

    def os_threads():
        return len(os.listdir("/proc/self/task"))

    def from_parked_threads(call, n=4):
        # n request threads that stay alive (as a server's worker threads do) after one call each
        done, release = threading.Barrier(n + 1), threading.Event()
        def worker():
            call(); done.wait(); release.wait()
        threads = [threading.Thread(target=worker) for _ in range(n)]
        before = os_threads()
        for t in threads: t.start()
        done.wait()
        grown = os_threads() - before - n  # OS threads beyond the request threads themselves
        release.set()
        for t in threads: t.join()
        return grown

    import numpy as np
    image = np.random.default_rng(0).random((1, 256, 256), dtype=np.float32)
    model = ConvModel()
    lm = LoadedModel(model)
    lm.predict([image], [{}])  # the inference thread and its pool exist from here on
    served = from_parked_threads(lambda: lm.predict([image], [{}]))
    direct = from_parked_threads(lambda: model.predict([image], [{}]))  # last: their pools end asynchronously
    print(json.dumps({"torch_threads": torch.get_num_threads(), "direct": direct, "served": served}))
""")


def test_request_threads_do_not_grow_openmp_pools():
    """Real torch: calling the model directly from 4 parked request threads grows OpenMP helper threads
    (one pool per thread: the slowdown's cause; usually 4, one per pool); calling it through
    LoadedModel grows none."""
    out = subprocess.run([sys.executable, "-c", _POOL_PROBE, str(REPO)], capture_output=True, text=True,
                         timeout=300, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-2000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    if probe["direct"] == 0:
        pytest.skip(f"this torch build keeps no OpenMP pool per thread ({probe}): nothing to guard against")
    assert probe["served"] == 0, f"request threads grew OpenMP pools through LoadedModel: {probe}"


def test_a_forked_child_serves_on_a_thread_of_its_own():
    """After fork the child has no copy of the inference thread; it must start one, not wait forever."""
    import multiprocessing

    lm = LoadedModel(RecordingModel())
    lm.predict([np.ones((1, 2, 2), np.float32)], [{}])  # the parent's inference thread exists
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        result = pool.apply_async(_predict_in_child).get(timeout=60)
    assert result == 1.0


def _predict_in_child() -> float:
    return LoadedModel(RecordingModel()).predict([np.ones((1, 2, 2), np.float32)], [{}])[0]["p_covid19"]
