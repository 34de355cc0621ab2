"""Parts of `histocsc serve` on their own: dynamic batcher, job store, path and key checks."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from histocsc.serve.batching import Batcher, Overloaded
from histocsc.serve.jobs import JobStore
from histocsc.serve.metrics import Metrics
from histocsc.serve.security import HttpError, authorized, resolve_slide, upload_name


class Recorder:
    """A model stand-in: sums each tile, records the batch sizes it was called with."""

    def __init__(self, fail: bool = False) -> None:
        self.sizes: list[int] = []
        self.fail = fail
        self.threads: set[str] = set()

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        self.sizes.append(len(tiles))
        self.threads.add(threading.current_thread().name)
        if self.fail:
            raise RuntimeError("model broke")
        return tiles.reshape(len(tiles), -1).sum(1, dtype=np.float32)[:, None]


def requests(n: int, size: int) -> list[np.ndarray]:
    return [np.full((size, 2, 2, 3), i, np.uint8) for i in range(n)]


def test_queued_requests_merge_up_to_max_batch_without_splitting() -> None:
    model, metrics = Recorder(), Metrics()
    batcher = Batcher(model, max_batch=8, max_delay_s=60.0, metrics=metrics)
    parts = requests(6, 3) + requests(1, 2)
    futures = [batcher.submit(t) for t in parts]  # all queued before the worker starts
    batcher.start()
    results = [f.result(timeout=120) for f in futures]
    batcher.stop()
    # two 3-tile requests fit in 8, a third would not; the last batch is 3 + 3 + 2 = 8 tiles.
    # The queue never drops under 8 tiles, so nothing waits for the (long) delay.
    assert model.sizes == [6, 6, 8]
    assert model.threads == {"histocsc-batcher"}
    for t, r in zip(parts, results, strict=True):
        np.testing.assert_array_equal(r[:, 0], t.reshape(len(t), -1).sum(1))
    value = metrics.registry.get_sample_value
    assert value("histocsc_inference_exec_count_total") == 3
    assert value("histocsc_inference_count_total") == 20


def test_a_full_batch_runs_without_waiting_for_the_delay() -> None:
    model = Recorder()
    batcher = Batcher(model, max_batch=4, max_delay_s=3600.0)
    batcher.start()
    try:
        got = batcher.submit(requests(1, 4)[0]).result(timeout=120)  # long before the delay
    finally:
        batcher.stop()
    assert got.shape == (4, 1) and model.sizes == [4]


def test_a_lone_request_runs_after_the_delay_and_big_ones_in_chunks() -> None:
    model = Recorder()
    batcher = Batcher(model, max_batch=4, max_delay_s=0.01)
    batcher.start()
    try:
        assert batcher.submit(requests(1, 1)[0]).result(timeout=120).shape == (1, 1)
        assert batcher.submit(requests(1, 10)[0]).result(timeout=120).shape == (10, 1)
    finally:
        batcher.stop()
    assert model.sizes == [1, 4, 4, 2]


def test_model_errors_reach_every_request_and_the_queue_is_bounded() -> None:
    batcher = Batcher(Recorder(fail=True), max_batch=6, max_delay_s=3600.0, max_pending_tiles=6)
    futures = [batcher.submit(t) for t in requests(2, 3)]
    with pytest.raises(Overloaded):
        batcher.submit(requests(1, 1)[0])
    batcher.start()
    for f in futures:
        with pytest.raises(RuntimeError, match="model broke"):
            f.result(timeout=120)
    batcher.stop()
    with pytest.raises(Overloaded, match="shutting down"):
        batcher.submit(requests(1, 1)[0])


def test_store_recovery_fails_running_jobs_and_keeps_the_others(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    for job_id in ("a", "b", "c"):
        store.add(job_id, tmp_path / f"{job_id}.svs", "path", None, 0.5, 2.0, "sum")
    assert store.next_queued().id == "a"  # now running
    store.output_dir("a").mkdir(parents=True)
    assert store.next_queued().id == "b"
    store.finish("b", "succeeded", mpp_used=0.5)
    store.close()
    store = JobStore(tmp_path)  # as after a restart
    (store.root / "orphan" / "upload").mkdir(parents=True)  # an upload cut short by a kill
    assert store.recover() == (["a"], ["orphan"])
    assert not (store.root / "orphan").exists() and store.folder("c") != store.root
    states = {j.id: (j.state, j.error) for j in store.list()}
    assert states["a"][0] == "failed" and "interrupted" in states["a"][1]
    assert states["b"] == ("succeeded", None) and states["c"] == ("queued", None)
    assert not store.output_dir("a").exists()
    store.finish("b", "failed", "late")  # a finished job does not change state again
    assert store.get("b").state == "succeeded"


def test_slide_paths_confined_to_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.svs").write_bytes(b"x")
    (tmp_path / "secret.svs").write_bytes(b"x")
    os.symlink(tmp_path / "secret.svs", root / "out.svs")
    os.symlink(root / "sub" / "a.svs", root / "in.svs")
    assert resolve_slide(root, "sub/a.svs") == (root / "sub" / "a.svs").resolve()
    assert resolve_slide(root, str(root / "sub" / "a.svs")).name == "a.svs"
    assert resolve_slide(root, "in.svs").name == "a.svs"  # a link that stays inside is fine
    for bad in ("../secret.svs", "sub/../../secret.svs", str(tmp_path / "secret.svs"),
                "out.svs"):
        with pytest.raises(HttpError) as err:
            resolve_slide(root, bad)
        assert err.value.status == 403, bad
    with pytest.raises(HttpError) as err:
        resolve_slide(None, "sub/a.svs")
    assert err.value.status == 403


def test_upload_names_and_bearer_keys() -> None:
    assert upload_name("C:\\scans\\case 1.SVS") == "case 1.SVS"
    assert upload_name("../../etc/x.tif") == "x.tif"
    for bad in ("", ".hidden.svs", "notes.txt", None):
        with pytest.raises(HttpError):
            upload_name(bad)
    key = b"0123456789abcdef"
    assert authorized("Bearer 0123456789abcdef", key)
    assert authorized("bearer 0123456789abcdef", key)
    for bad in (None, "", "0123456789abcdef", "Bearer 0123456789abcdeX", "Basic 0123456789abcdef",
                "Bearer 0123456789abcdef0"):
        assert not authorized(bad, key)


def test_stopping_fails_queued_requests_instead_of_running_them() -> None:
    model = Recorder()
    batcher = Batcher(model, max_batch=4, max_delay_s=3600.0)
    futures = [batcher.submit(t) for t in requests(3, 2)]
    batcher.stop()  # a SIGTERM: the queue is not worked off (it could take minutes)
    for f in futures:
        with pytest.raises(Overloaded, match="shutting down"):
            f.result(timeout=10)
    assert model.sizes == []
