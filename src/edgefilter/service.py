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
import uuid
from typing import Callable

from .agi import AgiServer
from .config import Settings, load_settings
from .decisionlog import DecisionLogger, setup_logging
from .errors import ConfigError
from .lists import ListIndex, Pattern
from .numbers import warm_up
from .routes import DecisionObserver, screen_route
from .screen import Decision, Screener
from .spool import Spool
from .store import CallRecord
from .stores import AnyStore, open_store

log = logging.getLogger("edgefilter.service")

FULL_RELOAD_AFTER = 20000  # changes behind: cheaper to reload everything than to replay them


class ListFollower:
    """Keeps the in-memory index in step with the database through the change feed.

    ``run`` applies changes whenever the store nudges it (``wake``: PostgreSQL's LISTEN/NOTIFY)
    and at least every poll interval (the fallback, and SQLite's only feed). When the database
    is not there at start, the service screens with empty lists and the follower loads them as
    soon as it answers.
    """

    def __init__(self, store: AnyStore, screener: Screener) -> None:
        self.store = store
        self.screener = screener
        self.rev = 0
        self.applied = 0
        self.loaded = False
        self.stale = False
        self.nudged = asyncio.Event()

    def wake(self) -> None:
        """Called by the store's change listener: a change was committed somewhere."""
        self.nudged.set()

    def resync(self) -> None:
        """Called by the change listener after it lost the database: reload everything next."""
        self.stale = True
        self.nudged.set()

    async def load(self) -> int:
        t0 = time.perf_counter()
        rev = await self.store.head_rev()
        index = ListIndex()
        async for batch in self.store.iter_entries():
            index.extend(batch)
        self.screener.index = index
        self.rev = rev
        self.loaded = True
        log.info("loaded %d list entries in %.0f ms (rev %d)", index.size, (time.perf_counter() - t0) * 1000, rev)
        return index.size

    async def poll(self) -> int:
        """Apply changes made since the last poll; returns how many were applied."""
        if not self.loaded or self.stale:
            if not self.loaded:
                await self.store.migrate()
            self.stale = False
            try:
                return await self.load()
            except BaseException:
                self.stale = self.loaded
                raise
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

    async def run(self, interval: Callable[[], float]) -> None:
        """Poll on every nudge and every ``interval()`` seconds; back off while the store fails."""
        failing, delay = False, 0.0
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.nudged.wait(), max(interval(), delay))
            self.nudged.clear()
            try:
                await self.poll()
                if failing:
                    log.info("list follower recovered (%s)", self.store.where)
                failing, delay = False, 0.0
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if not failing:
                    log.warning("list follower failed (%s); screening continues from memory", self.store.describe_error(e))
                failing = True
                delay = min(max(delay * 2, 0.5), 2.0)


class CallLogWriter:
    """Bounded queue of call records written in batches; never blocks or fails a call.

    When the store cannot take a batch, it goes to the on-disk spool (bounded by count) and so do
    the batches after it, in order, until a drain (retried with backoff) has emptied the spool
    into the store. Each record carries a unique key, so a batch written twice is stored once.
    """

    def __init__(self, store: AnyStore, spool: Spool, node: str = "", maxsize: int = 10000, batch: int = 500) -> None:
        self.store = store
        self.spool = spool
        self.node = node
        self.queue: asyncio.Queue[CallRecord] = asyncio.Queue(maxsize)
        self.batch = batch
        self.dropped = 0
        self.written = 0
        self.failing = False
        self._delay = 0.0
        self._next_try = 0.0

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
            node=self.node,
            key=uuid.uuid4().hex,
        )
        try:
            self.queue.put_nowait(rec)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped in (1, 100) or self.dropped % 10000 == 0:
                log.warning("call log queue full: %d records dropped (store too slow or failing)", self.dropped)

    def _take(self, first: CallRecord | None = None) -> list[CallRecord]:
        pending = [first] if first is not None else []
        while len(pending) < self.batch and not self.queue.empty():
            pending.append(self.queue.get_nowait())
        return pending

    async def run(self) -> None:
        while True:
            if self.spool.count:  # a backlog: wake up to retry the drain even with no new calls
                wait = max(0.05, self._next_try - time.monotonic())
                try:
                    pending = self._take(await asyncio.wait_for(self.queue.get(), wait))
                except asyncio.TimeoutError:
                    pending = []
            else:
                pending = self._take(await self.queue.get())
            await self.write(pending)
            await asyncio.sleep(0.05)

    async def write(self, pending: list[CallRecord]) -> None:
        """Store a batch, or spool it behind the backlog; then try to drain the backlog."""
        if pending and not self.spool.count and not self.failing:
            try:
                self.written += await self.store.record_calls(pending)
                return
            except Exception as e:
                self._failed(e)
        if pending:
            await self._to_spool(pending)
        await self.drain()

    async def drain(self) -> None:
        """Move spooled records to the store, oldest first, until empty or the store fails."""
        if time.monotonic() < self._next_try:
            return
        if not self.spool.count:
            self.failing = False  # nothing waits (the spool itself failed): try the store again
            return
        moved = 0
        while self.spool.count:
            rows = await self.spool.peek(self.batch)
            if not rows:
                break
            try:
                self.written += await self.store.record_calls([r for _, r in rows])
            except Exception as e:
                self._failed(e)
                return
            await self.spool.remove_through(rows[-1][0])  # only after the store committed them
            moved += len(rows)
        if self.failing or moved:
            log.info("call log: %s takes records again; %d buffered call records written", self.store.where, moved)
        self.failing, self._delay, self._next_try = False, 0.0, 0.0

    async def _to_spool(self, records: list[CallRecord]) -> None:
        try:
            dropped = await self.spool.add(records)
        except Exception as e:
            dropped = len(records)
            log.error("call log spool %s failed (%s): %d call records lost", self.spool.path, e, dropped)
        if dropped:
            self.dropped += dropped
            log.warning("call log spool %s full (%d records): %d call records dropped", self.spool.path, self.spool.max_records, dropped)

    def _failed(self, e: BaseException) -> None:
        self._delay = min(max(self._delay * 2, 0.5), 5.0)
        self._next_try = time.monotonic() + self._delay
        if not self.failing:
            log.warning(
                "call log: cannot write to the store (%s); buffering call records in %s, retrying with backoff",
                self.store.describe_error(e), self.spool.path,
            )
        self.failing = True

    async def flush(self, timeout: float = 5.0) -> None:
        """At stop: what is still queued goes to the store, else to the spool (next start drains it)."""
        rest = self._take()
        if not rest:
            return
        if not self.spool.count and not self.failing:
            try:
                self.written += await asyncio.wait_for(self.store.record_calls(rest), timeout)
                return
            except Exception as e:
                self._failed(e)
        await self._to_spool(rest)


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
        self.store: AnyStore | None = None
        self.spool: Spool | None = None
        self._store_cm = None
        self._stopped = asyncio.Event()
        self.follower: ListFollower | None = None
        self.calllog: CallLogWriter | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    async def start(self) -> None:
        s = self.settings
        warm_up(s.default_region)
        self._store_cm = open_store(s, connect=False)
        self.store = await self._store_cm.__aenter__()
        self.spool = await Spool.open(s.store.spool_path, s.store.spool_max)
        if self.spool.count:
            log.info("call log spool %s holds %d records from before; writing them when the store answers", self.spool.path, self.spool.count)
        self.follower = ListFollower(self.store, self.screener)
        if self.store.backend == "sqlite":
            await self.follower.load()  # a local file: failures here are for the admin, at once
        else:
            try:
                await asyncio.wait_for(self.follower.poll(), 15.0)  # migrate + load
            except Exception as e:
                reason = self.store.describe_error(e) if not isinstance(e, asyncio.TimeoutError) else f"{s.store.where}: no answer in 15 s"
                log.error("cannot load the lists (%s); screening without them until the database answers", reason)
        self.calllog = CallLogWriter(self.store, self.spool, s.store.node)
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
            asyncio.create_task(self.follower.run(lambda: self.settings.store.poll_interval)),
            asyncio.create_task(self.store.watch_changes(self.follower.wake, self.follower.resync)),
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
                    log.warning("%s failed (%s); screening continues from memory", name, self.store.describe_error(e))
                failing = True

    async def _maintenance(self) -> None:
        assert self.store is not None
        purged = await self.store.purge_expired()
        if purged:
            log.info("purged %d expired list entries", purged)
        await self.store.trim_changes()
        old = await self.store.purge_calls(time.time() - self.settings.store.history_retention)
        if old:
            log.info("purged %d call records older than the retention", old)

    def reload(self) -> bool:
        """Re-read the config; keep the old one if the new one is invalid."""
        try:
            new = load_settings(self.config_path)
        except ConfigError as e:
            log.error("reload refused, old config stays in force: %s", e)
            return False
        old = self.settings.store
        if new.agi.listen != self.settings.agi.listen or (new.store.path, new.store.url, new.store.spool_path) != (old.path, old.url, old.spool_path):
            log.warning("[agi] listen and [store] path/url/spool_path changes take effect only after a restart")
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
        if self.spool is not None:
            await self.spool.close()
            self.spool = None
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
