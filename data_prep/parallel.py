"""The converters' worker processes and progress bar.

Work is spread over worker processes with an ordered, bounded :func:`parallel_map`, so the
output order never depends on timing and memory stays bounded when the writer is slower than
the workers.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

# Set by tests only: seconds to sleep per written sample, so that a test can kill a
# conversion part-way through and check what it leaves behind.
TEST_DELAY_ENV = "FASTSIAM_CONVERT_TEST_DELAY"


def _apply_chunk(fn: Callable[[Any], Any], chunk: list[Any]) -> list[Any]:
    return [fn(x) for x in chunk]


def start_method() -> str:
    """``fork`` while this process runs a single Python thread, else ``spawn``.

    Forked workers start in milliseconds and need no re-imports; forking while other threads
    run (a progress bar's monitor, DALI's Python workers) can deadlock the child, so then the
    workers are spawned (fresh interpreters: ~0.2-0.5 s each to import numpy and PIL).
    """
    if threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods():
        return "fork"
    return "spawn"


def parallel_map(fn: Callable[[Any], Any], items: Iterable[Any], *, workers: int,
                 chunksize: int = 16, window: int | None = None,
                 inline: bool = True) -> Iterator[Any]:
    """``map(fn, items)`` over ``workers`` processes, results in input order.

    The worker processes start right away (create the map before a progress bar, whose
    monitor thread would rule out ``fork``; see :func:`start_method`). At most ``window``
    chunks (default ``4 * workers``) are in flight, so memory stays bounded when the consumer
    (a writer) is slower than the workers; results never depend on timing. ``workers == 1``
    runs in this process unless ``inline`` is False. ``fn`` must be picklable (a module-level function or a
    ``functools.partial`` of one).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1 and inline:
        return (fn(x) for x in items)
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(start_method()))
    executor.submit(os.getpid).result()  # launches every worker now
    results = _ordered(executor, fn, items, chunksize, window or 4 * workers)
    next(results)  # inside its try: closing it now shuts the pool down even before a result
    return results


def _ordered(executor: ProcessPoolExecutor, fn: Callable[[Any], Any], items: Iterable[Any],
             chunksize: int, window: int) -> Iterator[Any]:
    pending: deque = deque()
    try:
        yield  # the priming step of parallel_map
        chunk: list[Any] = []
        for x in items:
            chunk.append(x)
            if len(chunk) == chunksize:
                pending.append(executor.submit(_apply_chunk, fn, chunk))
                chunk = []
                if len(pending) >= window:
                    yield from pending.popleft().result()
        if chunk:
            pending.append(executor.submit(_apply_chunk, fn, chunk))
        while pending:
            yield from pending.popleft().result()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def progress(total: int, desc: str, quiet: bool = False):
    """A progress bar showing images/s and the ETA (tqdm, on stderr)."""
    from tqdm import tqdm

    class Bar(tqdm):
        # No monitor thread: it outlives the bar, and a second thread rules out forking
        # the next worker pool (start_method); the bar is updated for every image anyway.
        monitor_interval = 0

    return Bar(total=total, desc=desc, unit="img", disable=quiet, mininterval=0.5,
               dynamic_ncols=True, smoothing=0.1)


def injected_delay() -> float:
    """Seconds to sleep per written sample (only tests set it, see ``TEST_DELAY_ENV``)."""
    return float(os.environ.get(TEST_DELAY_ENV, "0") or 0)
