"""Several screening processes on one port, so that a box uses all its cores.

One Python process screens on one core (the GIL): about 2,000 calls/s on a 2-vCPU Xeon. With
``[agi] workers = N`` (or ``edgefilter serve --workers N``) this pool starts N ordinary
``edgefilter serve`` processes that each bind the listen port with SO_REUSEPORT; the Linux kernel
spreads incoming FastAGI connections across them. Each worker is a whole service: its own event
loop, its own in-memory lists following the store's change feed (a CLI change reaches every
worker within one poll interval), its own call-log writer (SQLite WAL serialises the writers).
Only worker 0 runs the periodic maintenance. Memory grows with N: every worker holds the lists.

The pool itself only supervises: it forwards SIGHUP (reload) and SIGTERM/SIGINT (stop) and
restarts a worker that dies, giving up if one keeps dying at start-up (bad port, bad database).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import sys
import time

from edgefilter.asterisk.challenge import SECRET_ENV
from edgefilter.core.errors import EdgefilterError
from edgefilter.systemd import child_environment

log = logging.getLogger("edgefilter.workers")

QUICK_FAILURE = 5.0  # a worker that dies within this many seconds of its start failed to start
MAX_QUICK_FAILURES = 3


class WorkerPool:
    def __init__(self, config_path: str | None, count: int, listen: tuple[str, int]) -> None:
        if listen[1] == 0:
            raise EdgefilterError("[agi] workers > 1 needs a fixed port in [agi] listen (not 0): the workers share it")
        self.config_path = config_path
        self.count = count
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.started: dict[int, float] = {}
        self.quick_failures: dict[int, int] = {}
        self.stopping = False
        # one sealing key for every worker: a challenge issued by one is checked by any other
        self.challenge_secret = secrets.token_hex(32)

    def _argv(self, index: int) -> list[str]:
        argv = [sys.executable, "-m", "edgefilter", "serve", "--worker", str(index)]
        if self.config_path:
            argv += ["--config", str(self.config_path)]
        return argv

    async def _spawn(self, index: int) -> None:
        env = {**child_environment(), SECRET_ENV: self.challenge_secret}
        self.procs[index] = await asyncio.create_subprocess_exec(*self._argv(index), stdin=asyncio.subprocess.DEVNULL, env=env)
        self.started[index] = time.monotonic()

    def _signal_all(self, sig: int) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    async def _watch(self, index: int) -> None:
        while not self.stopping:
            status = await self.procs[index].wait()
            if self.stopping:
                return
            lived = time.monotonic() - self.started[index]
            if lived < QUICK_FAILURE:
                self.quick_failures[index] = self.quick_failures.get(index, 0) + 1
            else:
                self.quick_failures[index] = 0
            if self.quick_failures[index] >= MAX_QUICK_FAILURES:
                raise EdgefilterError(f"worker {index} keeps failing at start-up (exit status {status}); see its log lines above")
            log.warning("worker %d exited with status %s after %.0f s; restarting it", index, status, lived)
            await asyncio.sleep(1.0)
            if not self.stopping:
                await self._spawn(index)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._signal_all, signal.SIGHUP)
        for i in range(self.count):
            await self._spawn(i)
        watchers = [asyncio.create_task(self._watch(i)) for i in range(self.count)]
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([stopper, *watchers], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                failed = task.exception() if task is not stopper else None
                if failed is not None:
                    raise failed
        finally:
            self.stopping = True
            log.info("stopping %d workers", self.count)
            self._signal_all(signal.SIGTERM)
            for proc in self.procs.values():
                try:
                    await asyncio.wait_for(proc.wait(), 15)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            for task in [stopper, *watchers]:
                task.cancel()
            await asyncio.gather(stopper, *watchers, return_exceptions=True)
