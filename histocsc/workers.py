"""Process pools that stop at once on Ctrl-C.

Workers are spawned with SIGINT ignored (a spawned Python keeps an ignored SIGINT), so Ctrl-C
reaches only the main process, without a traceback from every worker. The main process stays
interruptible the whole time: SIGINT is ignored only while each worker process is launched,
not while it starts up. When the block using the pool ends with an exception (Ctrl-C
included), queued jobs are cancelled and running workers are terminated instead of being
waited for; the caller removes their partial outputs.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any


def _started(_: int) -> bool:
    return True


@contextlib.contextmanager
def process_pool(
    workers: int, initializer: Callable[[], Any] | None = None
) -> Iterator[ProcessPoolExecutor]:
    """A spawn-context pool of `workers` processes, all started before the block runs."""
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=initializer)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
    try:  # each submit launches one worker process (spawn pools launch them on demand)
        started: list[Future[bool]] = [pool.submit(_started, i) for i in range(workers)]
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)
    try:
        for future in started:
            future.result()
        yield pool
    except BaseException:
        stop_now(pool)
        raise
    pool.shutdown(wait=True)


def stop_now(pool: ProcessPoolExecutor) -> None:
    """Cancel queued jobs and terminate the running workers."""
    processes = list(getattr(pool, "_processes", {}).values())  # no public API before 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=10)
