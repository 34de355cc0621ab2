"""Slide-job records in SQLite under the server's data folder.

A job moves queued -> running -> succeeded | failed | cancelled. On start-up, jobs left
`running` by a stopped or crashed server are marked failed (their partial outputs are removed),
jobs still `queued` stay queued and run, and job folders without a record (an upload cut short
by a kill) are removed.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
INTERRUPTED = "interrupted: the server stopped while this job was running; submit it again"

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    slide TEXT NOT NULL,
    source TEXT NOT NULL,
    slide_mpp REAL,
    mpp_used REAL,
    model_mpp REAL,
    model_checksum TEXT NOT NULL,
    tiles_done INTEGER NOT NULL DEFAULT 0,
    tiles_total INTEGER,
    error TEXT
)
"""


@dataclass
class Job:
    """One slide job as stored."""

    id: str
    state: str
    created: float
    started: float | None
    finished: float | None
    slide: str  # the slide file the job reads (inside --slides-root or the job's upload)
    source: str  # "path" or "upload"
    slide_mpp: float | None  # pixel size given by the client, if any
    mpp_used: float | None  # the slide pixel size used (the file's own or slide_mpp)
    model_mpp: float | None  # the model's tile resolution
    model_checksum: str
    tiles_done: int
    tiles_total: int | None
    error: str | None

    def public(self, slides_root: Path | None) -> dict[str, Any]:
        """The job as the API shows it: the slide as the client named it, no server folders."""
        out = asdict(self)
        slide = Path(self.slide)
        if self.source == "upload":
            out["slide"] = slide.name
        elif slides_root is not None and slide.is_relative_to(slides_root.resolve()):
            out["slide"] = str(slide.relative_to(slides_root.resolve()))
        return out


class JobStore:
    """Thread-safe job table plus one folder per job (`jobs/<id>/`)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.root = data_dir / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(data_dir / "jobs.sqlite", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def folder(self, job_id: str) -> Path:
        return self.root / job_id

    def output_dir(self, job_id: str) -> Path:
        return self.folder(job_id) / "out"

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    def add(self, job_id: str, slide: Path, source: str, slide_mpp: float | None,
            mpp_used: float, model_mpp: float, model_checksum: str) -> Job:
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, state, created, slide, source, slide_mpp, mpp_used, "
                "model_mpp, model_checksum) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
                (job_id, time.time(), str(slide), source, slide_mpp, mpp_used, model_mpp,
                 model_checksum))
        job = self.get(job_id)
        assert job is not None
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job(*row) if row else None

    def list(self, state: str | None = None) -> list[Job]:
        query, args = "SELECT * FROM jobs", ()
        if state is not None:
            query, args = query + " WHERE state = ?", (state,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created, id", args).fetchall()
        return [Job(*r) for r in rows]

    def writable(self) -> bool:
        """Whether a small file can be written in the data folder now (a full disk: False)."""
        probe = self.data_dir / ".write-probe"
        try:
            with probe.open("wb") as f:
                f.write(b"histocsc write probe\n")
            probe.unlink()
        except OSError:
            return False
        return True

    def count(self, state: str) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM jobs WHERE state = ?",
                                        (state,)).fetchone()[0])

    def waiting(self) -> int:
        """Jobs queued or running."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM jobs WHERE state IN "
                                        "('queued', 'running')").fetchone()[0])

    def next_queued(self) -> Job | None:
        """Mark the oldest queued job running and return it."""
        with self._lock:
            row = self._db.execute("SELECT id FROM jobs WHERE state = 'queued' "
                                   "ORDER BY created, id LIMIT 1").fetchone()
            if row is None:
                return None
            self._db.execute("UPDATE jobs SET state = 'running', started = ? WHERE id = ?",
                             (time.time(), row[0]))
        return self.get(row[0])

    def progress(self, job_id: str, done: int, total: int) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET tiles_done = ?, tiles_total = ? WHERE id = ?",
                             (done, total, job_id))

    def finish(self, job_id: str, state: str, error: str | None = None,
               mpp_used: float | None = None) -> None:
        """Move a job to a finished state (only from queued or running)."""
        assert state in FINISHED
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET state = ?, finished = ?, error = ?, "
                "mpp_used = COALESCE(?, mpp_used) WHERE id = ? AND state IN ('queued', 'running')",
                (state, time.time(), error, mpp_used, job_id))

    def delete(self, job_id: str) -> None:
        """Remove the record and the job's folder."""
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        self.remove_files(job_id)

    def remove_files(self, job_id: str) -> None:
        shutil.rmtree(self.folder(job_id), ignore_errors=True)

    def recover(self) -> tuple[list[str], list[str]]:
        """After a restart: jobs left running are failed and their partial outputs removed, and
        folders without a record removed. Returns (interrupted ids, removed folder names)."""
        stale = [j.id for j in self.list("running")]
        for job_id in stale:
            self.finish(job_id, "failed", INTERRUPTED)
            shutil.rmtree(self.output_dir(job_id), ignore_errors=True)
        known = {j.id for j in self.list()}
        orphans = sorted(p.name for p in self.root.iterdir() if p.name not in known)
        for name in orphans:
            path = self.root / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return stale, orphans
