"""The slide-job runner: one thread that feeds queued jobs, in order, to a worker process.

The thread survives any error: a job's own failure is recorded on the job; a database that
cannot be written (a full disk) leaves the job's outcome pending and retried every second,
with no new job taken meanwhile, until the write succeeds. A cancel or a server stop kills the
worker process (`histocsc.serve.worker`) at once, whatever step the job is in; the next job
gets a new worker.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from histocsc.predict.engine import InferOptions
from histocsc.serve import worker
from histocsc.serve.jobs import INTERRUPTED, Job, JobStore
from histocsc.serve.metrics import Metrics
from histocsc.serve.redact import redactions

log = logging.getLogger("histocsc.serve")
POLL_S = 0.1  # how often a running job checks for cancel / stop
RETRY_S = 1.0  # wait before retrying after an error (a database that cannot be written)
PROBE_S = 2.0  # how often the data folder is checked for writes
JOBS_PER_WORKER = 100  # a worker process is replaced after this many jobs
CANCELLED = "cancelled by the client"


@dataclass
class Outcome:
    """How a job ended, to be written to the store (retried until it is)."""

    job_id: str
    state: str
    error: str | None = None
    mpp_used: float | None = None
    remove: str | None = None  # "outputs" or "all": files to remove first


class _Child:
    """A worker process and the server's end of its pipe."""

    def __init__(self, model: Path, device: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=worker.main, name="histocsc-job-worker", daemon=True,
                                args=(str(model), device, theirs, os.getpid()))
        self.proc.start()
        theirs.close()
        self.jobs = 0
        self.ready = False

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(10)
        self.conn.close()


class JobRunner:
    """Runs queued jobs one at a time; `cancel` and `stop` take effect within POLL_S."""

    def __init__(self, model: Path, device: str, store: JobStore, metrics: Metrics,
                 options: InferOptions, data_dir: Path, slides_root: Path | None) -> None:
        self.model, self.device = model, device
        self.store = store
        self.metrics = metrics
        self.options = options
        self.data_dir, self.slides_root = data_dir, slides_root
        self.data_ok = True
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._current: str | None = None
        self._cancelled: set[str] = set()
        self._pending: list[Outcome] = []
        self._stopping = False
        self._child: _Child | None = None
        self._thread: threading.Thread | None = None
        self._probed = 0.0
        self._done = 0  # tiles of the running job counted in the metrics

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="histocsc-jobs", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Kill the running job (it is marked failed, interrupted) and end the thread."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._child is not None:  # the thread is stuck (in a database call): end it anyway
            self._child.kill()

    def wake(self) -> None:
        """A job was queued."""
        self._wake.set()

    def cancel(self, job_id: str) -> str:
        """Cancel a queued or running job: 'cancelled' at once, or 'cancelling' if running."""
        with self._lock:
            if self._current == job_id:
                self._cancelled.add(job_id)
                return "cancelling"
            self.store.finish(job_id, "cancelled", CANCELLED)
            self.store.remove_files(job_id)
            return "cancelled"

    def _loop(self) -> None:
        while not self._stopping:
            try:
                self._step()
            except Exception:  # noqa: BLE001 - the worker must outlive any error
                log.exception("job runner: error; retrying in %g s", RETRY_S)
                self._wake.wait(RETRY_S)
        if self._child is not None:
            self._child.kill()
            self._child = None

    def _step(self) -> None:
        self._probe()
        if not self._settle():
            self._wake.wait(RETRY_S)
            return
        job = self._take()
        if job is None:
            self._wake.wait(PROBE_S)
            self._wake.clear()
            return
        try:
            outcome = self._run(job)
        finally:
            with self._lock:
                self._current = None
                self._cancelled.discard(job.id)
        self._pending.append(outcome)
        self._settle()

    def _probe(self) -> None:
        """Whether the data folder takes writes (readiness reports it)."""
        if time.monotonic() - self._probed >= PROBE_S:
            self.data_ok = self.store.writable()
            self._probed = time.monotonic()

    def _settle(self) -> bool:
        """Write the pending outcomes; False if the store still refuses one."""
        while self._pending:
            o = self._pending[0]
            if o.remove == "all":
                self.store.remove_files(o.job_id)
            elif o.remove == "outputs":
                shutil.rmtree(self.store.output_dir(o.job_id), ignore_errors=True)
            try:
                self.store.finish(o.job_id, o.state, o.error, o.mpp_used)
            except Exception as exc:  # noqa: BLE001 - sqlite3 errors: full disk, I/O
                log.error("job %s: cannot record %s (%s); retrying", o.job_id, o.state, exc)
                self.data_ok = False
                return False
            log.info("job %s: %s%s", o.job_id, o.state, f": {o.error}" if o.error else "")
            self._pending.pop(0)
        return True

    def _take(self) -> Job | None:
        with self._lock:
            job = None if self._stopping else self.store.next_queued()
            self._current = job.id if job else None
            return job

    def _worker(self) -> _Child:
        child = self._child
        if child is None or not child.proc.is_alive() or child.jobs >= JOBS_PER_WORKER:
            if child is not None:
                child.kill()
            child = self._child = _Child(self.model, self.device)
        return child

    def _interrupt(self, job_id: str) -> Outcome | None:
        """The outcome if the job was cancelled or the server is stopping, else None."""
        if job_id in self._cancelled:
            return Outcome(job_id, "cancelled", CANCELLED, remove="all")
        if self._stopping:
            return Outcome(job_id, "failed", INTERRUPTED, remove="outputs")
        return None

    def _run(self, job: Job) -> Outcome:
        """Run `job` in the worker process; its outcome (never raises for job problems)."""
        out = self.store.output_dir(job.id)
        shutil.rmtree(out, ignore_errors=True)
        shown = str(job.public(self.slides_root)["slide"])
        folders = [self.store.folder(job.id), self.data_dir]
        folders += [self.slides_root] if self.slides_root is not None else []
        spec = {"slide": job.slide, "out": str(out), "batch": self.options.batch,
                "workers": self.options.workers, "slide_mpp": job.slide_mpp,
                "min_tissue": self.options.min_tissue,
                "redact": redactions(Path(job.slide), shown, self.model, folders)}
        log.info("job %s: started on %s", job.id, shown)
        self._done = 0
        child = self._worker()
        sent = False
        while True:
            self._probe()
            outcome = self._interrupt(job.id)
            if outcome is not None:
                child.kill()
                self._child = None
                return outcome
            if not sent and child.ready:
                child.conn.send(spec)
                child.jobs, sent = child.jobs + 1, True
            try:
                message = child.conn.recv() if child.conn.poll(POLL_S) else None
            except (EOFError, OSError):
                message = ("died",)
            if message is None:
                continue
            kind = message[0]
            if kind == "ready":
                child.ready = True
            elif kind == "progress":
                self._progress(job.id, *message[1:])
            elif kind == "done":
                return Outcome(job.id, "succeeded", mpp_used=message[1])
            elif kind in ("failed", "broken", "died"):
                if kind != "failed":
                    child.kill()
                    self._child = None
                    code = child.proc.exitcode
                    message = (kind, message[1] if len(message) > 1 else
                               f"the job worker process ended unexpectedly (exit code {code})")
                return Outcome(job.id, "failed", message[1], remove="outputs")

    def _progress(self, job_id: str, done: int, total: int) -> None:
        try:
            self.store.progress(job_id, done, total)
        except Exception as exc:  # noqa: BLE001 - progress is not worth failing a job over
            log.warning("job %s: cannot record progress (%s)", job_id, exc)
        self.metrics.tiles.labels(source="job").inc(max(0, done - self._done))
        self._done = done
