"""Submission limits that hold under concurrency: job slots, and upload bytes in flight.

A slot is taken before the request body is read and the slide opened, and given back when the
job is stored (it is counted as queued from then on) or the submission fails. Check and take
happen under one lock, so 30 concurrent submissions against a limit of 2 get 2 slots.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from histocsc.serve.security import HttpError

RETRY_AFTER_S = 30


class Admission:
    """Counts jobs waiting (stored + being submitted) and upload bytes being received."""

    def __init__(self, max_jobs: int, stored: Callable[[], int], max_upload_bytes: int) -> None:
        self.max_jobs = max_jobs
        self.stored = stored  # jobs queued or running in the store
        self.max_upload_bytes = max_upload_bytes
        self._lock = threading.Lock()
        self._submitting = 0
        self._bytes = 0

    @contextlib.contextmanager
    def job_slot(self) -> Iterator[None]:
        """A place for one more job, or 429 with Retry-After."""
        with self._lock:
            waiting = self.stored() + self._submitting
            if waiting >= self.max_jobs:
                raise HttpError(429, f"{waiting} jobs already queued, running or being "
                                     "submitted; retry later", {"Retry-After": str(RETRY_AFTER_S)})
            self._submitting += 1
        try:
            yield
        finally:
            with self._lock:
                self._submitting -= 1

    @contextlib.contextmanager
    def upload_bytes(self, size: int) -> Iterator[None]:
        """Room for an upload of `size` bytes among those in flight, or 429 with Retry-After."""
        with self._lock:
            if self._bytes + size > self.max_upload_bytes:
                raise HttpError(429, f"{self._bytes} bytes of uploads already in flight (limit "
                                     f"{self.max_upload_bytes}); retry later",
                                {"Retry-After": str(RETRY_AFTER_S)})
            self._bytes += size
        try:
            yield
        finally:
            with self._lock:
                self._bytes -= size
