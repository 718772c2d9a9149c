"""`edgefilter serve`: the daemon that wires store, screener, FastAGI server and background tasks.

The call path touches only memory: lists are loaded once and then followed through the store's
change feed; call records go into a bounded queue written in batches. Every background task
survives store failures (it logs and retries) so a locked or full disk degrades bookkeeping,
never screening. SIGHUP reloads the config atomically; SIGTERM/SIGINT stop cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from typing import Callable

from .agi import AgiServer
from .config import Settings, load_settings
from .decisionlog import DecisionLogger, setup_logging
from .errors import ConfigError, StoreError
from .lists import ListIndex, Pattern
from .numbers import warm_up
from .routes import DecisionObserver, screen_route
from .screen import Decision, Screener
from .store import CallRecord, Store, describe_sqlite_error, load_index

log = logging.getLogger("edgefilter.service")

FULL_RELOAD_AFTER = 20000  # changes behind: cheaper to reload everything than to replay them


class ListFollower:
    """Keeps the in-memory index in step with the database through the change feed."""

    def __init__(self, store: Store, screener: Screener) -> None:
        self.store = store
        self.screener = screener
        self.rev = 0
        self.applied = 0

    async def load(self) -> int:
        t0 = time.perf_counter()
        if self.store.path == ":memory:":
            rev = await self.store.head_rev()
            index = ListIndex()
            async for batch in self.store.iter_entries():
                index.extend(batch)
        else:  # a worker thread with its own connection: calls keep being answered meanwhile
            rev, index = await asyncio.to_thread(load_index, self.store.path)
        self.screener.index = index
        self.rev = rev
        log.info("loaded %d list entries in %.0f ms (rev %d)", index.size, (time.perf_counter() - t0) * 1000, rev)
        return index.size

    async def poll(self) -> int:
        """Apply changes made since the last poll; returns how many were applied."""
        changes = await self.store.changes_since(self.rev, FULL_RELOAD_AFTER + 1)
        if not changes:
            head = await self.store.head_rev()
            if head < self.rev:  # the database was replaced or rebuilt under us
                log.warning("change feed went backwards (%d < %d): reloading all lists", head, self.rev)
                await self.load()
            return 0
        if len(changes) > FULL_RELOAD_AFTER:
            await self.load()
            return len(changes)
        index = self.screener.index
        for rev, op, list_name, pattern_text, entry in changes:
            if entry is not None:
                index.put(entry)
            else:
                index.remove(list_name, Pattern.from_text(pattern_text))
            self.rev = rev
        self.applied += len(changes)
        return len(changes)


class CallLogWriter:
    """Bounded queue of call records written in batches; never blocks or fails a call."""

    def __init__(self, store: Store, maxsize: int = 10000, batch: int = 500) -> None:
        self.store = store
        self.queue: asyncio.Queue[CallRecord] = asyncio.Queue(maxsize)
        self.batch = batch
        self.dropped = 0
        self.written = 0

    def __call__(self, d: Decision) -> None:
        v = d.verdict
        rec = CallRecord(
            ts=time.time(),
            uniqueid=d.call.uniqueid[:64],
            caller=d.call.callerid[:128],
            caller_e164=d.number.e164,
            caller_kind=d.number.kind.value,
            caller_name=d.call.calleridname[:128],
            called=d.call.called[:64],
            extension=(d.call.params.get("exten") or d.call.extension)[:64],
            context=d.call.context[:64],
            action=v.action.value,
            would=v.would.value if v.would else None,
            score=v.score,
            rules=" ".join(v.rules),
            policy=v.policy,
            elapsed_ms=round(d.elapsed_ms, 3),
        )
        try:
            self.queue.put_nowait(rec)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped in (1, 100) or self.dropped % 10000 == 0:
                log.warning("call log queue full: %d records dropped (store too slow or failing)", self.dropped)

    async def run(self) -> None:
        pending: list[CallRecord] = []
        while True:
            if not pending:
                pending.append(await self.queue.get())
            while len(pending) < self.batch and not self.queue.empty():
                pending.append(self.queue.get_nowait())
            try:
                self.written += await self.store.record_calls(pending)
                pending = []
            except Exception as e:
                log.warning("call log write failed (%s); retrying in 1 s", _store_reason(self.store, e))
                await asyncio.sleep(1.0)
            await asyncio.sleep(0.05)

    async def flush(self) -> None:
        rest = []
        while not self.queue.empty():
            rest.append(self.queue.get_nowait())
        if rest:
            with contextlib.suppress(Exception):
                self.written += await self.store.record_calls(rest)


def _store_reason(store: Store, e: BaseException) -> str:
    if isinstance(e, StoreError):
        return str(e)
    return describe_sqlite_error(store.path, e)


class Service:
    """The running daemon. ``start`` then ``run_forever`` (or ``stop`` from tests)."""

    def __init__(self, settings: Settings, *, config_path: str | None = None, port: int | None = None) -> None:
        self.settings = settings
        self.config_path = config_path
        self.port_override = port
        self.screener = Screener(settings)
        self.observers: list[DecisionObserver] = []
        self.tasks: list[asyncio.Task] = []
        self.server: AgiServer | None = None
        self.store: Store | None = None
        self._store_cm = None
        self._stopped = asyncio.Event()
        self.follower: ListFollower | None = None
        self.calllog: CallLogWriter | None = None
        self.clock: Callable[[], float] = time.time  # maintenance's notion of now (tests inject one)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    async def start(self) -> None:
        s = self.settings
        warm_up(s.default_region)
        self._store_cm = Store.open(s.store.path)
        self.store = await self._store_cm.__aenter__()
        self.follower = ListFollower(self.store, self.screener)
        await self.follower.load()
        self.calllog = CallLogWriter(self.store)
        self.observers.extend([DecisionLogger(s.log_format), self.calllog])
        host, port = s.agi.listen
        self.server = AgiServer(
            {"screen": screen_route(self.screener, self.observers)},
            host=host,
            port=self.port_override if self.port_override is not None else port,
            read_timeout=s.agi.read_timeout,
            max_env_bytes=s.agi.max_env_bytes,
            max_sessions=s.agi.max_sessions,
            allow_peers=s.agi.allow_peers,
        )
        await self.server.start()
        self.tasks = [
            asyncio.create_task(self._every(lambda: self.settings.store.poll_interval, self.follower.poll, "list follower")),
            asyncio.create_task(self.calllog.run()),
            asyncio.create_task(self._every(lambda: 600.0, self._maintenance, "maintenance")),
        ]

    async def _every(self, interval: Callable[[], float], job, name: str) -> None:
        failing = False
        while True:
            await asyncio.sleep(interval())
            try:
                await job()
                if failing:
                    log.info("%s recovered", name)
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if not failing:
                    log.warning("%s failed (%s); screening continues from memory", name, _store_reason(self.store, e))
                failing = True

    async def _maintenance(self) -> None:
        assert self.store is not None
        now = self.clock()
        purged = await self.store.purge_expired(now)
        if purged:
            log.info("purged %d expired list entries", purged)
        await self.store.trim_changes()
        old = await self.store.purge_calls(now - self.settings.store.history_retention)
        if old:
            log.info("purged %d call records older than the retention", old)

    def reload(self) -> bool:
        """Re-read the config; keep the old one if the new one is invalid."""
        try:
            new = load_settings(self.config_path)
        except ConfigError as e:
            log.error("reload refused, old config stays in force: %s", e)
            return False
        if new.agi.listen != self.settings.agi.listen or new.store.path != self.settings.store.path:
            log.warning("[agi] listen and [store] path changes take effect only after a restart")
        self.settings = new
        self.screener.reload(new)
        for obs in self.observers:
            if isinstance(obs, DecisionLogger):
                obs.fmt = new.log_format
        logging.getLogger().setLevel(new.log_level.upper())
        log.info("config reloaded from %s", ", ".join(new.sources))
        return True

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.calllog is not None:
            await self.calllog.flush()
        if self._store_cm is not None:
            await self._store_cm.__aexit__(None, None, None)
            self._store_cm = None
        self._stopped.set()

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await stop.wait()
        log.info("stopping")
        await self.stop()


async def serve(config_path: str | None) -> None:
    settings = load_settings(config_path)
    setup_logging(settings.log_level)
    log.info("edgefilter %s starting (pid %d), config: %s", _version(), os.getpid(), ", ".join(settings.sources))
    service = Service(settings, config_path=config_path)
    await service.start()
    await service.run_forever()


def _version() -> str:
    from . import __version__

    return __version__
