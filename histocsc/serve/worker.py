"""The slide-job worker process: the code of `histocsc infer`, one job at a time, in a child.

A child process, not a thread, so that a cancel or a server stop takes effect at once, in any
step (tissue mask, grid, tiles, outputs): the server kills the child and starts a new one for
the next job. The child also keeps its memory out of the server's. It loads its own engine,
reads job specs from a pipe and answers with messages:

- `("progress", done, total)` after each tile batch;
- `("done", mpp_used, tiles)` once the outputs are written (server paths redacted);
- `("failed", message)` with the error, server folders removed from it.

It ends when the pipe closes or the server process is gone (a kill -9 leaves no orphan).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

log = logging.getLogger("histocsc.serve")
PARENT_CHECK_S = 0.5


def _watch_parent(parent_pid: int) -> None:
    """Exit as soon as the server process is gone (its pid is no longer our parent)."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_S)
    os._exit(1)


def _progress(conn: Connection) -> Callable[[str, int], contextlib.AbstractContextManager]:
    @contextlib.contextmanager
    def factory(_name: str, total: int) -> Iterator[Callable[[int], None]]:
        done = 0
        conn.send(("progress", 0, total))

        def advance(n: int) -> None:
            nonlocal done
            done += n
            conn.send(("progress", done, total))

        yield advance

    return factory


def release_memory() -> None:
    """Give freed memory back to the system after a job (glibc keeps it in its arenas, so the
    worker's RSS would creep up job by job)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def run_job(engine: Any, spec: dict[str, Any], conn: Connection) -> tuple:
    """Run one job spec; the message to send back."""
    from histocsc.predict.engine import InferOptions, infer_slide
    from histocsc.serve.redact import redact, redact_outputs

    pairs = [tuple(p) for p in spec["redact"]]
    out = Path(spec["out"])
    options = InferOptions(batch=spec["batch"], workers=spec["workers"],
                           slide_mpp=spec["slide_mpp"], min_tissue=spec["min_tissue"])
    try:
        summary = infer_slide(engine, spec["slide"], out, options, progress=_progress(conn),
                              warn=log.info)
        redact_outputs(out, pairs)
    except Exception as exc:  # noqa: BLE001 - recorded on the job, shown to the client
        return ("failed", redact(str(exc) or exc.__class__.__name__, pairs))
    return ("done", float(summary["slide"]["mpp"]), int(summary["tiles"]))


def main(model: str, device: str, conn: Connection, parent_pid: int) -> None:
    """The child's entry point (multiprocessing, spawn)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from histocsc.predict.engine import Engine

    try:
        engine = Engine(Path(model), device=device)
    except Exception as exc:  # noqa: BLE001 - the server logs it and fails the job
        conn.send(("broken", f"the job worker cannot load the model: {exc}"))
        return
    conn.send(("ready",))
    while True:
        try:
            spec = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(run_job(engine, spec, conn))
        release_memory()
