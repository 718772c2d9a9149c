"""Parsing a big feed on every core: a million-line file is mostly Python work per line.

The file is cut into slices of lines that parse independently (feeds.plan_slices: text files,
and CSV files where a line is a row) and each slice is parsed in a worker process into a compact
feeds.Chunk; chunks come back in file order, so line numbers, refusals and "duplicate of line N"
read exactly as with one process (tests/test_feedworkers.py compares them). Anything that
cannot be cut (vCard, quoted CSV) and small files are parsed in this process.

Workers are forked, so they see the file's lines without copying them through a pipe. They are
started before the caller opens its database (a fork while another thread holds a lock can
leave the child stuck), ignore Ctrl-C (the parent decides), and are killed by the kernel if the
parent dies (a kill -9 of an import leaves no orphan parsing on).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from edgefilter.lists.feeds import Chunk, FeedOptions, Slices, chunked, count_lines, feed_values, parse_slice, plan_slices

#: Below this many lines one process is faster than starting workers (~50 ms each).
PARALLEL_MIN_LINES = 50_000
#: Lines per slice: small enough that the first chunk is back quickly (the parent stages it
#: while the workers go on), large enough that sending results costs little.
SLICE_LINES = 50_000
MAX_JOBS = 8

_job: tuple[Slices, FeedOptions] | None = None


def default_jobs() -> int:
    """The CPUs this process may run on (taskset and cgroup cpusets included), at most MAX_JOBS."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_JOBS))


def parse_chunks(text: str, fmt: str, opts: FeedOptions, jobs: int) -> Iterator[Chunk]:  # and close()
    """The file's Chunks in file order, from ``jobs`` worker processes when that pays.

    Not a generator: the workers start now (see the module docstring). Raises FeedError at once
    for a file that cannot be read as ``fmt`` with ``opts``.
    """
    slices = None
    if jobs > 1 and count_lines(text) >= PARALLEL_MIN_LINES:
        slices = plan_slices(text, fmt, opts, SLICE_LINES)
    if slices is None or len(slices.ranges) < 2:
        return chunked(feed_values(text, fmt, opts), opts)
    try:
        pool = ProcessPoolExecutor(
            min(jobs, len(slices.ranges)), mp_context=get_context("fork"), initializer=_start_worker,
            initargs=((slices, opts), os.getpid()),
        )
        results = pool.map(_parse, range(len(slices.ranges)))
    except (OSError, NotImplementedError, ImportError):  # no processes or semaphores (limits,
        # no /dev/shm in a container): one process does it all
        return chunked(feed_values(text, fmt, opts), opts)
    return _InOrder(pool, results)


class _InOrder:
    """The workers' chunks in file order; close() (or the end) stops the workers."""

    def __init__(self, pool: ProcessPoolExecutor, results: Iterator[Chunk]) -> None:
        self.pool = pool
        self.results = results

    def __iter__(self) -> _InOrder:
        return self

    def __next__(self) -> Chunk:
        try:
            return next(self.results)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _start_worker(job: tuple[Slices, FeedOptions], parent: int) -> None:
    global _job
    _job = job
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    """prctl(PR_SET_PDEATHSIG, SIGKILL): the kernel kills this worker when the parent dies."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl: nobody waits for our results
        os._exit(1)


def _parse(i: int) -> Chunk:
    assert _job is not None
    slices, opts = _job
    return parse_slice(slices, i, opts)
