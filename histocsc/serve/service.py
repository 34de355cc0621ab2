"""What one server holds: settings, the engine, the batcher, the job store and runner, metrics."""

from __future__ import annotations

import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from histocsc.cpu import cpu_count
from histocsc.errors import ConfigError
from histocsc.predict.engine import Engine, InferOptions
from histocsc.serve.admission import Admission
from histocsc.serve.batching import Batcher
from histocsc.serve.jobs import STATES, JobStore
from histocsc.serve.metrics import Metrics
from histocsc.serve.runner import JobRunner
from histocsc.serve.security import load_api_key

MODEL_VERSION = "1"
MIB = 1024 * 1024


@dataclass
class ServeSettings:
    """Options of `histocsc serve`."""

    model: Path
    host: str = "127.0.0.1"
    port: int = 8000
    slides_root: Path | None = None
    data: Path = Path("histocsc-serve")
    api_key_file: Path | None = None
    max_batch: int = 64
    max_queue_delay_ms: float = 5.0
    max_tiles_per_request: int = 256
    max_upload_mb: float = 4096.0
    max_uploads_in_flight_mb: float | None = None  # None: twice --max-upload-mb
    max_queued_jobs: int = 16
    max_slide_px: int = 250_000
    header_timeout_s: float = 10.0
    model_name: str = "histocsc"
    device: str = "auto"
    job_batch: int = 32
    job_workers: int = field(default_factory=lambda: max(1, cpu_count() // 4))

    def check(self) -> None:
        """ConfigError naming the first bad option."""
        limits = {"--max-batch": self.max_batch, "--max-tiles-per-request":
                  self.max_tiles_per_request, "--max-queued-jobs": self.max_queued_jobs,
                  "--max-upload-mb": self.max_upload_mb, "--max-slide-px": self.max_slide_px,
                  "--header-timeout": self.header_timeout_s}
        for name, value in limits.items():
            if not value > 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.uploads_in_flight_mb < self.max_upload_mb:
            raise ConfigError(f"--max-uploads-in-flight-mb ({self.uploads_in_flight_mb:g}) must "
                              f"be at least --max-upload-mb ({self.max_upload_mb:g})")
        if not self.max_queue_delay_ms >= 0:
            raise ConfigError(f"--max-queue-delay-ms must be >= 0, got {self.max_queue_delay_ms}")
        if self.slides_root is not None and not self.slides_root.is_dir():
            raise ConfigError(f"{self.slides_root}: --slides-root is not a folder")
        if not self.model_name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"--model-name must be letters, digits, - or _, got "
                              f"{self.model_name!r}")

    @property
    def uploads_in_flight_mb(self) -> float:
        return self.max_uploads_in_flight_mb or 2 * self.max_upload_mb


def open_store(data: Path) -> tuple[JobStore, list[str], list[str]]:
    """The job store in `data`, recovered after a stop (interrupted ids, orphan folders);
    ConfigError in one line if the folder cannot be written."""
    try:
        data.mkdir(parents=True, exist_ok=True)
        store = JobStore(data)
        if not store.writable():
            raise OSError("a test file cannot be written")
        interrupted, orphans = store.recover()
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError(f"{data}: the --data folder is not writable ({exc})") from None
    return store, interrupted, orphans


class Service:
    """The parts of a running server; routes reach it as `request.app.state.service`."""

    def __init__(self, settings: ServeSettings) -> None:
        settings.check()
        self.settings = settings
        self.api_key = load_api_key(settings.api_key_file) if settings.api_key_file else None
        self.store, self.interrupted, self.orphans = open_store(settings.data)
        self.engine = Engine(settings.model, device=settings.device)
        self.metrics = Metrics()
        self.batcher = Batcher(self.engine.predict, settings.max_batch,
                               settings.max_queue_delay_ms / 1000, self.metrics)
        # big JSON bodies are parsed here, one at a time: parsing holds the GIL, so more threads
        # would not parse faster, only crowd the event loop (and the health checks) out of it
        self.decoder = ThreadPoolExecutor(1, thread_name_prefix="histocsc-decode")
        self.metrics.watch_jobs(STATES, self.store.count)
        self.admission = Admission(settings.max_queued_jobs, self.store.waiting,
                                   int(settings.uploads_in_flight_mb * MIB))
        self.runner = JobRunner(settings.model, self.engine.device, self.store, self.metrics,
                                InferOptions(batch=settings.job_batch,
                                             workers=settings.job_workers),
                                settings.data, settings.slides_root)
        self.ready = False

    def start(self) -> None:
        """Start the batcher and the job runner."""
        self.batcher.start()
        self.runner.start()
        self.ready = True

    def stop(self) -> None:
        self.ready = False
        self.runner.stop()
        self.batcher.stop()
        self.decoder.shutdown(wait=False, cancel_futures=True)
        self.store.close()

    def not_ready(self) -> list[str]:
        """Why the server is not ready (empty when it is); in-memory flags only, no I/O."""
        reasons = []
        if not self.ready:
            reasons.append("starting or stopping")
        if not self.batcher.running:
            reasons.append("the inference batcher is not running")
        if not self.runner.alive:
            reasons.append("the slide-job worker is not running")
        if not self.runner.data_ok:
            reasons.append("the --data folder does not take writes (disk full?)")
        return reasons

    @property
    def max_upload_bytes(self) -> int:
        return int(self.settings.max_upload_mb * MIB)


def service(request: Request) -> Service:
    """The Service of the app handling `request`."""
    return request.app.state.service
