"""The served model's request batching: packing concurrent requests into generate() calls, answering
each request with its own captions, and sizing batches to the request timeout."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from fashioncap.config import GenerateParams
from fashioncap.serving import Batcher, DeadlineExceeded, Job, QueueFull, batch_images_within, pack

GREEDY = GenerateParams(num_beams=1, max_new_tokens=8, min_length=0, repetition_penalty=1.0,
                        no_repeat_ngram_size=0, batch_size=4)
BEAMS = GREEDY.model_copy(update={"num_beams": 3})


def test_pack_keeps_arrival_order_and_never_exceeds_the_batch():
    jobs = [Job([f"a{i}"] * n, GREEDY) for i, n in enumerate([1, 2, 1, 3, 1])]
    batches = pack(jobs, max_images=4)
    assert [[len(j.images) for j in b] for b in batches] == [[1, 2, 1], [3, 1]]
    assert [j for b in batches for j in b] == jobs  # every job exactly once, in order


def test_pack_never_mixes_generation_settings_in_one_call():
    jobs = [Job(["x"], GREEDY), Job(["y"], BEAMS), Job(["z"], GREEDY)]
    batches = pack(jobs, max_images=8)
    assert [[j.images[0] for j in b] for b in batches] == [["x", "z"], ["y"]]


def test_a_request_larger_than_the_batch_is_a_batch_of_its_own():
    jobs = [Job(["a"], GREEDY), Job(["b"] * 6, GREEDY), Job(["c"], GREEDY)]
    assert [[len(j.images) for j in b] for b in pack(jobs, max_images=4)] == [[1], [6], [1]]


class Recorder:
    """A captioner that names each image and records the calls it got."""

    def __init__(self, seconds: float = 0.0, fail_on: str | None = None):
        self.calls: list[list[str]] = []
        self.seconds, self.fail_on, self.lock = seconds, fail_on, threading.Lock()

    def __call__(self, images, generate):
        with self.lock:
            self.calls.append(list(images))
        time.sleep(self.seconds)
        if self.fail_on in images:
            raise RuntimeError("generate failed")
        return [f"caption of {im} ({generate.num_beams} beams)" for im in images]


def test_concurrent_requests_share_generate_calls_and_each_gets_its_own_captions():
    recorder = Recorder(seconds=0.05)
    batcher = Batcher(recorder, max_images=8, max_wait_s=0.05)
    requests = [[f"img{i}-{k}" for k in range(1 + i % 2)] for i in range(24)]  # 1- and 2-image requests
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda images: batcher.submit(images, GREEDY), requests))
    assert answers == [[f"caption of {im} (1 beams)" for im in images] for images in requests]
    assert sorted(im for call in recorder.calls for im in call) == sorted(im for r in requests for im in r)
    assert max(len(call) for call in recorder.calls) <= 8
    assert len(recorder.calls) < len(requests) / 2, recorder.calls  # batched, not one call per request


def test_a_lone_request_waits_no_longer_than_the_window():
    batcher = Batcher(Recorder(), max_images=16, max_wait_s=0.02)
    started = time.perf_counter()
    assert batcher.submit(["only"], GREEDY) == ["caption of only (1 beams)"]
    assert time.perf_counter() - started < 0.5


def test_a_failed_batch_fails_its_requests_and_the_batcher_goes_on():
    batcher = Batcher(Recorder(fail_on="bad"), max_images=4, max_wait_s=0.0)
    with pytest.raises(RuntimeError, match="generate failed"):
        batcher.submit(["bad"], GREEDY)
    assert batcher.submit(["good"], BEAMS) == ["caption of good (3 beams)"]


def test_batch_fits_the_timeout_with_one_batch_ahead_of_it():
    # BLIP-base on a 2-core CPU, ~10 s per full-length caption, 300 s timeout: 80% of it holds 23 images,
    # a request may wait for one batch and then be in the next: 11 images a batch
    assert batch_images_within(300, 10.2, 16) == 11
    assert batch_images_within(300, 0.01, 16) == 16  # fast device: the configured batch
    assert batch_images_within(60, 90.0, 16) == 1  # never below one image


def test_a_request_whose_deadline_passes_while_it_waits_is_never_computed():
    recorder = Recorder(seconds=0.4)
    batcher = Batcher(recorder, max_images=1, max_wait_s=0.0)
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(batcher.submit, ["first"], GREEDY)
        time.sleep(0.05)  # "first" is being captioned
        started = time.perf_counter()
        with pytest.raises(DeadlineExceeded):
            batcher.submit(["late"], GREEDY, deadline=time.monotonic() + 0.1)
        assert time.perf_counter() - started < 0.3  # the caller hears at its deadline, not after the batch
        assert slow.result() == ["caption of first (1 beams)"]
    assert batcher.submit(["next"], GREEDY) == ["caption of next (1 beams)"]
    assert ["late"] not in recorder.calls and batcher.dropped == 1


def test_a_full_queue_refuses_at_once_and_takes_requests_again_once_it_drains():
    recorder = Recorder(seconds=0.3)
    batcher = Batcher(recorder, max_images=2, max_wait_s=0.0, max_waiting=3)
    with ThreadPoolExecutor(4) as pool:
        busy = pool.submit(batcher.submit, ["a", "b"], GREEDY)
        time.sleep(0.05)  # a, b in progress: nothing waits
        queued = [pool.submit(batcher.submit, [name], GREEDY) for name in ("c", "d", "e")]
        time.sleep(0.05)
        started = time.perf_counter()
        with pytest.raises(QueueFull, match="3 images are waiting .* the most this server queues is 3"):
            batcher.submit(["f"], GREEDY)
        assert time.perf_counter() - started < 0.05
        assert busy.result() == ["caption of a (1 beams)", "caption of b (1 beams)"]
        assert [q.result() for q in queued] == [[f"caption of {n} (1 beams)"] for n in "cde"]
    assert batcher.submit(["g"], GREEDY) == ["caption of g (1 beams)"]
    assert sorted(im for call in recorder.calls for im in call) == list("abcdeg")


def test_a_request_larger_than_the_queue_is_taken_when_nothing_waits():
    batcher = Batcher(Recorder(), max_images=2, max_wait_s=0.0, max_waiting=2)
    assert len(batcher.submit(["a", "b", "c", "d"], GREEDY)) == 4


def test_the_served_model_answers_a_full_queue_with_503_and_a_missed_deadline_with_504():
    from mlflow.exceptions import MlflowException

    from fashioncap.serving import Captioner

    captioner = Captioner()
    captioner.batcher = Batcher(Recorder(seconds=0.3), max_images=1, max_wait_s=0.0, max_waiting=1)
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(captioner._captions, ["a"], GREEDY, float("inf"))
        time.sleep(0.05)
        waiting = pool.submit(captioner._captions, ["b"], GREEDY, float("inf"))
        time.sleep(0.05)
        with pytest.raises(MlflowException) as full:
            captioner._captions(["c"], GREEDY, float("inf"))
        assert full.value.get_http_status_code() == 503 and "retry later" in full.value.message
        captioner.batcher.max_waiting = None  # "d" queues behind "a" and "b", and its deadline passes there
        with pytest.raises(MlflowException) as late:
            captioner._captions(["d"], GREEDY, time.monotonic() + 0.05)
        assert late.value.get_http_status_code() == 504
        assert busy.result() == ["caption of a (1 beams)"] and waiting.result() == ["caption of b (1 beams)"]


def test_a_server_without_batching_bounds_the_images_in_progress_too():
    """`--batch-size 1`: requests run side by side, at most `max_queued` images at once; beyond that 503."""
    from mlflow.exceptions import MlflowException

    from fashioncap.serving import Captioner

    captioner = Captioner()
    captioner.batcher, captioner.max_queued, captioner._in_flight = None, 2, 0
    captioner._in_flight_lock, captioner._caption = threading.Lock(), Recorder(seconds=0.3)
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(captioner._captions, ["a", "b"], GREEDY, float("inf"))
        time.sleep(0.05)
        with pytest.raises(MlflowException) as full:
            captioner._captions(["c"], GREEDY, float("inf"))
        assert full.value.get_http_status_code() == 503
        assert busy.result() == ["caption of a (1 beams)", "caption of b (1 beams)"]
    assert captioner._captions(["d"], GREEDY, float("inf")) == ["caption of d (1 beams)"]  # drained
    with pytest.raises(MlflowException) as late:
        captioner._captions(["e"], GREEDY, time.monotonic() - 1)
    assert late.value.get_http_status_code() == 504 and ["e"] not in captioner._caption.calls


SERVED_CONFIG = {"batch_images": 4, "batch_wait_ms": 20, "numerics": {"cpu_kernels": "avx2", "threads": 2}}


def test_serving_settings_are_read_once_from_the_registered_config_and_the_hosts_one_variable():
    from fashioncap.serving import SETTINGS_ENV, TIMEOUT_ENV, HostSettings, ServingSettings

    passing = ServingSettings.read(SERVED_CONFIG, {})  # a notebook, or log_model checking its input example
    assert (passing.request_timeout, passing.batch_images, passing.batch_wait_ms, passing.pin) == (None, 4, 20.0, False)
    host = HostSettings(batch_images=8, batch_wait_ms=5.0, request_threads=20)
    assert HostSettings.from_env(host.env()) == host and set(host.env()) == {SETTINGS_ENV}
    served = ServingSettings.read(SERVED_CONFIG, {**host.env(), TIMEOUT_ENV: "30"})  # `fashioncap serve -b 8`
    assert (served.request_timeout, served.batch_images, served.batch_wait_ms) == (30.0, 8, 5.0)
    assert served.pin and served.threads == 2  # the scoring server pins evaluate's numerics
    job = ServingSettings.read(SERVED_CONFIG, HostSettings(threads=0).env())  # `fashioncap caption`
    assert job.pin and job.threads == 2 and job.request_timeout is None
    assert ServingSettings.read(SERVED_CONFIG, HostSettings(threads=1).env()).threads == 1  # one Spark task's
    assert ServingSettings.read({}, {}).batch_images == 1  # versions registered before batching
    with pytest.raises(ValueError, match="unknown settings"):
        HostSettings.from_env({SETTINGS_ENV: '{"batch": 3}'})


def test_importing_the_serving_module_starts_nothing_and_the_entry_file_sets_the_model():
    import subprocess
    import sys

    check = ("import mlflow.models.model as m, fashioncap.serving; assert vars(m).get('__mlflow_model__') is None; "
             "import fashioncap.served_model; assert type(vars(m)['__mlflow_model__']).__name__ == 'Captioner'")
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
