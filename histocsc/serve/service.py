"""What one server holds: settings, the engine, the batcher, the job store and runner, metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from histocsc.cpu import cpu_count
from histocsc.errors import ConfigError
from histocsc.predict.engine import Engine, InferOptions
from histocsc.serve.batching import Batcher
from histocsc.serve.jobs import STATES, JobStore
from histocsc.serve.metrics import Metrics
from histocsc.serve.runner import JobRunner
from histocsc.serve.security import load_api_key

MODEL_VERSION = "1"


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
    max_queued_jobs: int = 16
    model_name: str = "histocsc"
    device: str = "auto"
    job_batch: int = 32
    job_workers: int = field(default_factory=lambda: max(1, cpu_count() // 4))

    def check(self) -> None:
        """ConfigError naming the first bad option."""
        limits = {"--max-batch": self.max_batch, "--max-tiles-per-request":
                  self.max_tiles_per_request, "--max-queued-jobs": self.max_queued_jobs,
                  "--max-upload-mb": self.max_upload_mb}
        for name, value in limits.items():
            if not value > 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if not self.max_queue_delay_ms >= 0:
            raise ConfigError(f"--max-queue-delay-ms must be >= 0, got {self.max_queue_delay_ms}")
        if self.slides_root is not None and not self.slides_root.is_dir():
            raise ConfigError(f"{self.slides_root}: --slides-root is not a folder")
        if not self.model_name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"--model-name must be letters, digits, - or _, got "
                              f"{self.model_name!r}")


class Service:
    """The parts of a running server; routes reach it as `request.app.state.service`."""

    def __init__(self, settings: ServeSettings) -> None:
        settings.check()
        self.settings = settings
        self.api_key = load_api_key(settings.api_key_file) if settings.api_key_file else None
        self.engine = Engine(settings.model, device=settings.device)
        self.metrics = Metrics()
        self.batcher = Batcher(self.engine.predict, settings.max_batch,
                               settings.max_queue_delay_ms / 1000, self.metrics)
        settings.data.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(settings.data)
        self.metrics.watch_jobs(STATES, self.store.count)
        self.runner = JobRunner(self.engine, self.store, self.metrics,
                                InferOptions(batch=settings.job_batch,
                                             workers=settings.job_workers))
        self.ready = False

    def start(self) -> list[str]:
        """Start the workers; returns the ids of jobs a previous run left running (now failed)."""
        interrupted = self.store.recover()
        self.batcher.start()
        self.runner.start()
        self.ready = True
        return interrupted

    def stop(self) -> None:
        self.ready = False
        self.runner.stop()
        self.batcher.stop()
        self.store.close()

    @property
    def max_upload_bytes(self) -> int:
        return int(self.settings.max_upload_mb * 1024 * 1024)


def service(request: Request) -> Service:
    """The Service of the app handling `request`."""
    return request.app.state.service
