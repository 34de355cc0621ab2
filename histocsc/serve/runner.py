"""The slide-job worker: one thread running queued jobs, in order, with the inference engine.

Each job calls `histocsc.predict.engine.infer_slide` (the code of `histocsc infer`) with a
progress callback that records tiles done and stops the job when it is cancelled or the server
is shutting down.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from histocsc.predict.engine import Engine, InferOptions, infer_slide
from histocsc.serve.jobs import INTERRUPTED, Job, JobStore
from histocsc.serve.metrics import Metrics

log = logging.getLogger("histocsc.serve")


class _Stop(Exception):
    """Raised from the progress callback to stop the running job."""


class JobRunner:
    """Runs queued jobs one at a time; `cancel` and `stop` take effect between tile batches."""

    def __init__(self, engine: Engine, store: JobStore, metrics: Metrics,
                 options: InferOptions) -> None:
        self.engine = engine
        self.store = store
        self.metrics = metrics
        self.options = options
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._current: str | None = None
        self._cancelled: set[str] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="histocsc-jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Interrupt the running job (it is marked failed) and end the worker."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def wake(self) -> None:
        """A job was queued."""
        self._wake.set()

    def cancel(self, job_id: str) -> str:
        """Cancel a queued or running job: 'cancelled' at once, or 'cancelling' if running."""
        with self._lock:
            if self._current == job_id:
                self._cancelled.add(job_id)
                return "cancelling"
            self.store.finish(job_id, "cancelled", "cancelled by the client")
            self.store.remove_files(job_id)
            return "cancelled"

    def _take(self) -> Job | None:
        with self._lock:
            job = None if self._stopping else self.store.next_queued()
            self._current = job.id if job else None
            return job

    def _loop(self) -> None:
        while not self._stopping:
            job = self._take()
            if job is None:
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                self._run(job)
            finally:
                with self._lock:
                    self._current = None
                    self._cancelled.discard(job.id)

    def _progress(self, job_id: str) -> Callable[[str, int], contextlib.AbstractContextManager]:
        @contextlib.contextmanager
        def factory(_name: str, total: int) -> Iterator[Callable[[int], None]]:
            done = 0
            self.store.progress(job_id, 0, total)

            def advance(n: int) -> None:
                nonlocal done
                done += n
                self.store.progress(job_id, done, total)
                self.metrics.tiles.labels(source="job").inc(n)
                if self._stopping or job_id in self._cancelled:
                    raise _Stop

            yield advance

        return factory

    def _run(self, job: Job) -> None:
        out = self.store.output_dir(job.id)
        shutil.rmtree(out, ignore_errors=True)
        options = InferOptions(batch=self.options.batch, workers=self.options.workers,
                               slide_mpp=job.slide_mpp, min_tissue=self.options.min_tissue)
        log.info("job %s: started on %s", job.id, Path(job.slide).name)
        try:
            summary = infer_slide(self.engine, job.slide, out, options,
                                  progress=self._progress(job.id))
        except _Stop:
            summary = None
        except Exception as exc:  # noqa: BLE001 - recorded on the job, shown to the client
            message = (str(exc) or exc.__class__.__name__).replace(
                str(self.store.folder(job.id)) + "/", "")
            log.warning("job %s: failed: %s", job.id, message)
            shutil.rmtree(out, ignore_errors=True)
            self.store.finish(job.id, "failed", message)
            return
        with self._lock:
            cancelled = job.id in self._cancelled
        if cancelled:
            log.info("job %s: cancelled", job.id)
            self.store.finish(job.id, "cancelled", "cancelled by the client")
            self.store.remove_files(job.id)
        elif summary is None:  # stopped by a shutdown
            log.info("job %s: interrupted by shutdown", job.id)
            shutil.rmtree(out, ignore_errors=True)
            self.store.finish(job.id, "failed", INTERRUPTED)
        else:
            log.info("job %s: succeeded, %d tiles", job.id, summary["tiles"])
            self.store.finish(job.id, "succeeded", mpp_used=float(summary["slide"]["mpp"]))
