"""Worker processes for tiling: a spawn pool that leaves Ctrl-C to the main process, and jobs
run in it (or in this process) reported as each finishes."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def process_pool(workers: int) -> Iterator[cf.Executor | None]:
    """A pool of `workers` spawned processes, all started; None (run here) for one worker."""
    if workers <= 1:
        yield None
        return
    ctx = multiprocessing.get_context("spawn")
    # Workers start with SIGINT ignored (they inherit it), so Ctrl-C stops only the main
    # process, which cancels what is queued and removes temporary files, without a traceback
    # from every worker.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
    try:
        pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
        list(pool.map(_started, range(workers)))  # start every worker now
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)
    with pool:
        yield pool


def _started(_: int) -> bool:
    return True


def unordered(
    pool: cf.Executor | None, fn: Callable[..., Any], jobs: dict[Any, tuple]
) -> Iterator[tuple[Any, Any, BaseException | None]]:
    """Run `fn(*args)` for each `key: args`; yield (key, result, error) as each finishes."""
    if pool is None:
        for key, args in jobs.items():
            try:
                result = fn(*args)
            except Exception as exc:  # noqa: BLE001 - reported per slide, as from a pool
                yield key, None, exc
            else:
                yield key, result, None
        return
    futures = {pool.submit(fn, *args): key for key, args in jobs.items()}
    try:
        for fut in cf.as_completed(futures):
            exc = fut.exception()
            yield futures[fut], (None if exc else fut.result()), exc
    finally:
        for fut in futures:
            fut.cancel()
