"""`edgefilter serve`: the daemon that wires store, screener, FastAGI server and background tasks.

The call path touches only memory: lists are loaded once and then followed through the store's
change feed; call records go into a bounded queue written in batches. Every background task
survives store failures (it logs and retries) so a locked or full disk degrades bookkeeping,
never screening. SIGHUP reloads the config atomically; SIGTERM/SIGINT stop cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from typing import Callable

from .agi import AgiServer
from .ami import AmiListener, load_secret
from .behaviour import KEYED_KINDS, RANG_ACTIONS, BehaviourRules, block_of
from .challenge import RESULT_ROUTE, ChallengeBook, ChallengeFailures, ChallengeRecorder
from .config import Settings, load_settings
from .decisionlog import DecisionLogger, escape_text, setup_logging
from .errors import AmiError, ConfigError, StoreError
from .events import Output, build_udp_outputs
from .history import RecentCall
from .lists import ListIndex, Pattern
from .mirror import AmiClient, BlockMirror
from .model import Number, NumberKind
from .numbers import warm_up
from .outcomes import OutcomeTracker
from .reputation import ReputationClient, ReputationLookup
from .routes import DecisionObserver, challenge_result_route, screen_route
from .screen import Decision, Screener
from .starcodes import StarCodes
from .store import CallOutcome, CallRecord, ContactSeen, Store, describe_sqlite_error

log = logging.getLogger("edgefilter.service")

FULL_RELOAD_AFTER = 20000  # changes behind: cheaper to reload everything than to replay them
SETTLE_HEAP_AFTER = 50000  # list entries from which settle_heap runs a full collection first


class ListFollower:
    """Keeps the in-memory index in step with the database through the change feed."""

    def __init__(self, store: Store, screener: Screener) -> None:
        self.store = store
        self.screener = screener
        self.rev = 0
        self.applied = 0
        #: called with (list, pattern text, entry or None) after each change is applied
        self.on_change: list[Callable[[str, str, object], None]] = []
        #: called after a full (re)load of the index
        self.on_load: list[Callable[[], None]] = []

    async def load(self) -> int:
        t0 = time.perf_counter()
        rev = await self.store.head_rev()
        index = ListIndex()
        async for batch in self.store.iter_entries():
            index.extend(batch)
        self.screener.index = index
        self.rev = rev
        del index
        settle_heap(collect=self.screener.index.size >= SETTLE_HEAP_AFTER)
        log.info("loaded %d list entries in %.0f ms (rev %d)", self.screener.index.size, (time.perf_counter() - t0) * 1000, rev)
        for hook in self.on_load:
            hook()
        return self.screener.index.size

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
            for hook in self.on_change:
                try:
                    hook(list_name, pattern_text, entry)
                except Exception:
                    log.exception("list change listener failed")
        self.applied += len(changes)
        return len(changes)


def settle_heap(collect: bool = True) -> None:
    """Move everything alive now (the freshly loaded lists) out of the cyclic GC's sight.

    With a million list entries in memory, every full collection walks millions of objects and
    stalls the event loop for tens to hundreds of milliseconds: the benchmark's p99 showed it.
    The index holds no reference cycles, so frozen objects are still freed by reference counting
    when a reload replaces them; ``unfreeze`` first so that the old generation is looked at once.
    ``collect`` first clears cyclic garbage (skipped for small lists, where it would cost more
    than the little garbage it keeps out of sight).
    """
    gc.unfreeze()
    if collect:
        gc.collect()
    gc.freeze()


class CallLogWriter:
    """Bounded queue of call records written in batches; never blocks or fails a call.

    AMI outcomes and known contacts go through the same queue, so an outcome is always written
    after the insert of its call.
    """

    def __init__(self, store: Store, maxsize: int = 10000, batch: int = 500, interval: float = 0.25) -> None:
        self.store = store
        self.queue: asyncio.Queue[object] = asyncio.Queue(maxsize)
        self.batch = batch
        # Pause between batches. Every batch is several hops to the SQLite thread, and each hop
        # hands it the GIL while calls wait: at 50 ms the profile showed the event loop stalled
        # in those hand-offs about 2.5% of the time, in bursts that reached the p99.
        self.interval = interval
        self.dropped = 0
        self.written = 0
        self.failures = 0
        self.retry_every = 1.0  # seconds between attempts while the store fails

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
        self.submit(rec)

    def submit(self, rec: object) -> None:
        """Queue a CallRecord, CallOutcome or ContactSeen; dropped (and counted) when full."""
        try:
            self.queue.put_nowait(rec)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped in (1, 100) or self.dropped % 10000 == 0:
                log.warning("call log queue full: %d records dropped (store too slow or failing)", self.dropped)

    async def run(self) -> None:
        """Write queued records in batches; a failing store is logged once, then on recovery.

        A failed batch is kept and retried (each batch is one transaction, so a retry never
        duplicates rows); while the store keeps failing, one reminder a minute at most.
        """
        pending: list[object] = []
        failing_since: float | None = None
        last_log = 0.0
        while True:
            if not pending:
                pending.append(await self.queue.get())
            while len(pending) < self.batch and not self.queue.empty():
                pending.append(self.queue.get_nowait())
            try:
                self.written += await self.store.write_batch(pending)
                pending = []
                if failing_since is not None:
                    log.info("call log writes recovered after %.0f s", time.monotonic() - failing_since)
                    failing_since = None
            except Exception as e:
                now = time.monotonic()
                self.failures += 1
                if failing_since is None or now - last_log >= 60.0:
                    log.warning(
                        "call log write failed (%s); %d records waiting, retrying every %g s; screening continues",
                        _store_reason(self.store, e), len(pending) + self.queue.qsize(), self.retry_every,
                    )
                    last_log = now
                    failing_since = failing_since if failing_since is not None else now
                await asyncio.sleep(self.retry_every)
            await asyncio.sleep(self.interval)

    async def flush(self) -> None:
        rest = []
        while not self.queue.empty():
            rest.append(self.queue.get_nowait())
        if rest:
            with contextlib.suppress(Exception):
                self.written += await self.store.write_batch(rest)


def _store_reason(store: Store, e: BaseException) -> str:
    if isinstance(e, StoreError):
        return str(e)
    return describe_sqlite_error(store.path, e)


class Service:
    """The running daemon. ``start`` then ``run_forever`` (or ``stop`` from tests)."""

    def __init__(
        self, settings: Settings, *, config_path: str | None = None, port: int | None = None,
        ami: AmiClient | None = None, worker: int | None = None,
    ) -> None:
        self.settings = settings
        #: an AMI client injected by tests (anything with ``async send_action(dict) -> dict``);
        #: otherwise the AmiListener built from [ami] at start. Feeds outcomes, drives the mirror.
        self.ami_client = ami
        self.ami: AmiListener | None = None
        self.mirror: BlockMirror | None = None
        self.config_path = config_path
        self.port_override = port
        self.worker = worker  # index in a multi-process pool (SO_REUSEPORT), None when alone
        self.screener = Screener(settings)
        self.observers: list[DecisionObserver] = []
        self.tasks: list[asyncio.Task] = []
        self.server: AgiServer | None = None
        self.store: Store | None = None
        self._store_cm = None
        self._stopped = asyncio.Event()
        self.follower: ListFollower | None = None
        self.calllog: CallLogWriter | None = None
        self.outputs: list[Output] = []  # StatsD / syslog / Prometheus outputs ([outputs]); also observers
        self._outputs_lock = asyncio.Lock()
        self.challenges = ChallengeBook(lambda: self.settings)
        self.challenge_failures = ChallengeFailures(lambda: self.settings)
        self.screener.sources.append(self.challenge_failures)
        self.challenge_recorder: ChallengeRecorder | None = None
        self.reputation: ReputationClient | None = None
        self.reputation_lookup: ReputationLookup | None = None
        self.reputation_starting: asyncio.Task | None = None  # sources first configured by a reload
        self.behaviour = BehaviourRules(lambda: self.settings)
        self.tracker = OutcomeTracker(
            self._outcome,
            clock=time.time,
            outbound=self._outbound_seen,
            outbound_contexts=lambda: self.settings.behaviour.outbound_contexts,
        )

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    async def start(self) -> None:
        s = self.settings
        secret = load_secret(s.ami) if s.ami.enabled else ""  # a bad secret file stops us here, clearly
        warm_up(s.default_region)
        self._store_cm = Store.open(s.store.path, busy_timeout_ms=int(s.store.busy_timeout * 1000))
        self.store = await self._store_cm.__aenter__()
        self.follower = ListFollower(self.store, self.screener)
        if s.ami.enabled and self.ami_client is None:
            self.ami = AmiListener(s.ami, secret, self.tracker.feed)
        ami_client = self.ami_client or self.ami
        if ami_client is not None and s.mirror.enabled and s.mirror.max_entries > 0 and not self.worker:
            self.mirror = BlockMirror(ami_client, lambda: self.settings, lambda: self.screener.index)
            self.follower.on_load.append(self.mirror.resync)
            self.follower.on_change.append(self.mirror.on_change)
        await self.follower.load()
        await self._load_history()
        self.screener.sources.append(self.behaviour)
        self.calllog = CallLogWriter(self.store)
        self.observers.extend([DecisionLogger(s.log_format), self.calllog, self._remember])
        await self._start_outputs(s)
        self.challenge_failures.load(await self.store.challenge_failures_since(time.time() - s.challenge.fail_window))
        self.challenge_recorder = ChallengeRecorder(
            lambda: self.settings, lambda: self.screener.index, self.challenge_failures, self.store
        )
        if s.reputation.active:
            await self._start_reputation(s)
        starcodes = StarCodes(lambda: self.store, self.behaviour, lambda: self.settings, self.calllog.submit, clock=time.time)
        host, port = s.agi.listen
        self.server = AgiServer(
            {
                "screen": screen_route(self.screener, self.observers, self.challenges),
                RESULT_ROUTE: challenge_result_route(self.challenges, self.challenge_recorder),
                **starcodes.routes(),
            },
            host=host,
            port=self.port_override if self.port_override is not None else port,
            read_timeout=s.agi.read_timeout,
            max_env_bytes=s.agi.max_env_bytes,
            max_sessions=s.agi.max_sessions,
            allow_peers=s.agi.allow_peers,
            reuse_port=self.worker is not None,
        )
        await self.server.start()
        if self.ami is not None:
            self.ami.start()
        self.tasks = [
            asyncio.create_task(self._every(lambda: self.settings.store.poll_interval, self.follower.poll, "list follower")),
            asyncio.create_task(self.calllog.run()),
            asyncio.create_task(self._every(lambda: self.settings.outputs.gauge_interval, self._gauges, "gauges")),
            asyncio.create_task(self.challenge_recorder.run()),
            asyncio.create_task(self._every(lambda: 30.0, self._sweep_challenges, "challenge sweep")),
        ]
        if not self.worker:  # one maintainer per database, not one per worker
            self.tasks.append(asyncio.create_task(self._every(lambda: 600.0, self._maintenance, "maintenance")))
        if self.mirror is not None:
            self.tasks.append(asyncio.create_task(self.mirror.run()))
            self.tasks.append(asyncio.create_task(self._every(lambda: 60.0, self._expire_mirror, "mirror expiry")))

    async def _start_outputs(self, s: Settings) -> None:
        """Start the configured outputs and observe decisions with them; a failing output is
        logged and left out: observability must never keep the filter from screening."""
        outputs: list[Output] = build_udp_outputs(s.outputs)
        if s.outputs.prometheus is not None:
            from .prometheus import PrometheusOutput  # prometheus_client is loaded only when used

            outputs.append(PrometheusOutput(s.outputs, rules=s.rules, outputs_stats=self.output_stats))
        for out in outputs:
            self.outputs.append(out)  # before start: a stop() during start still closes it
            try:
                await out.start()
            except OSError as e:
                log.error("[outputs] %s not started: %s", out.name, e)
                self.outputs.remove(out)
                continue
            self.observers.append(out)
        await self._gauges()

    async def _stop_outputs(self) -> None:
        outputs, self.outputs = self.outputs, []
        for out in outputs:
            with contextlib.suppress(ValueError):
                self.observers.remove(out)
        for out in outputs:
            try:
                await out.close()
            except Exception:
                log.exception("[outputs] %s did not close cleanly", out.name)

    async def _restart_outputs(self) -> None:
        async with self._outputs_lock:  # two quick SIGHUPs must not start the outputs twice
            await self._stop_outputs()
            await self._start_outputs(self.settings)
        log.info("[outputs] restarted: %s", ", ".join(o.name for o in self.outputs) or "none")

    def output_stats(self) -> dict[str, dict[str, int]]:
        """Each output's running counters (sent, dropped, refused...), for gauges and /metrics."""
        return {o.name: st for o in self.outputs if (st := o.stats())}

    async def _gauges(self) -> None:
        """List sizes (O(1) from the in-memory index) to every output; periodic, never per call."""
        if not self.outputs:
            return
        counts = self.screener.index.counts()
        stats = self.output_stats()
        for out in self.outputs:
            out.gauges(counts, stats)

    async def _start_reputation(self, s: Settings) -> None:
        """Online reputation sources are asked only when some are configured (docs/reputation.md)."""
        self.reputation = ReputationClient(s.reputation, self.store)
        await self.reputation.start()
        self.reputation_lookup = ReputationLookup(self.reputation, s, lambda: self.screener.index)
        self.screener.async_sources.append(self.reputation_lookup)
        log.info("reputation sources: %s", ", ".join(src.name for src in s.reputation.active))

    async def _load_history(self) -> None:
        """Fill the behaviour rules' memory from the store: recent calls, last caller per
        extension, refusals in force, known contacts."""
        assert self.store is not None
        t0 = time.perf_counter()
        b = self.settings.behaviour
        h = self.behaviour.history
        now = self.screener.clock()
        for ts, uid, e164, kind, called, exten, answered, talk, action in await self.store.history_rows(now - b.horizon, b.memory_calls):
            try:
                nk = NumberKind(kind)
            except ValueError:
                nk = NumberKind.GARBAGE
            num = Number("", nk, e164)
            h.add(RecentCall(ts, uid, e164 if nk in KEYED_KINDS else None, exten or called,
                             block_of(num, b.campaign_block_digits),
                             None if answered is None else bool(answered), talk, action in RANG_ACTIONS), now)
        for exten, ts, uid, e164, called in await self.store.last_callers():
            h.last_by_target.setdefault(exten, RecentCall(ts, uid, e164, exten))
        active = await self.store.refusals(active_only=True)
        h.load_refusals((r.caller_e164, r.callee) for r in active)
        for e164, ts in await self.store.contacts(now - b.known_contact_ttl):
            h.add_contact(e164, ts)
        log.info("behaviour memory: %d recent calls, %d extensions, %d refusals, %d contacts in %.0f ms",
                 len(h), len(h.last_by_target), len(active), len(h.contacts), (time.perf_counter() - t0) * 1000)

    def _remember(self, d: Decision) -> None:
        """Decision observer: feed the history and the AMI outcome tracker; note violations."""
        self.behaviour.record(d.call, d.number, self.screener.clock(), d.verdict.action.value)
        self.tracker.register(d.call.uniqueid[:64], d.call.params.get("linkedid", "")[:64])
        if "REFUSED_BEFORE" in d.verdict.rules:
            log.warning("violation: %s called %s after being refused (action %s)",
                        d.number.e164, escape_text(d.call.params.get("exten") or d.call.extension, 64), d.verdict.action.value)

    def _outcome(self, o: CallOutcome) -> None:
        h = self.behaviour.history
        rc = h.set_outcome(o.uniqueid, o.answered, o.talk_seconds)
        if self.calllog is not None:
            self.calllog.submit(o)
        b = self.settings.behaviour
        if rc is not None and rc.caller and o.answered and (o.talk_seconds or 0.0) >= b.known_contact_talk:
            now = time.time()
            h.add_contact(rc.caller, now)
            if self.calllog is not None:
                self.calllog.submit(ContactSeen(rc.caller, now, "talked"))

    async def send_ami_action(self, action: dict) -> dict:
        """An AMI action for other features (e.g. DBPut); AmiError at once when AMI is disabled
        or not connected, never a wait for a reconnection."""
        if self.ami is None:
            raise AmiError("AMI is disabled ([ami] enabled = false)")
        return await self.ami.send_action(action)

    def _outbound_seen(self, raw: str, now: float) -> None:
        from .numbers import normalize

        n = normalize(raw, self.settings.default_region)
        if n.kind in (NumberKind.VALID, NumberKind.SHORT) and n.e164:
            self.behaviour.history.add_contact(n.e164, now)
            if self.calllog is not None:
                self.calllog.submit(ContactSeen(n.e164, now, "outbound"))

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

    async def _expire_mirror(self) -> None:
        assert self.mirror is not None
        self.mirror.expire()

    async def _sweep_challenges(self) -> None:
        self.challenges.sweep()

    async def _maintenance(self) -> None:
        assert self.store is not None
        purged = await self.store.purge_expired()
        if purged:
            log.info("purged %d expired list entries", purged)
        await self.store.trim_changes()
        old = await self.store.purge_calls(time.time() - self.settings.store.history_retention)
        if old:
            log.info("purged %d call records older than the retention", old)
        await self.store.purge_challenges(time.time() - self.settings.challenge.fail_window)
        stale = await self.store.purge_reputation(expired_at=time.time())
        if stale:
            log.info("purged %d expired reputation answers", stale)

    def reload(self) -> bool:
        """Re-read the config; keep the old one if the new one is invalid."""
        try:
            new = load_settings(self.config_path)
        except ConfigError as e:
            log.error("reload refused, old config stays in force: %s", e)
            return False
        outputs_changed = new.outputs != self.settings.outputs
        if new.ami != self.settings.ami:
            log.warning("[ami] changes take effect only after a restart")
        if (new.agi.listen, new.agi.workers, new.store.path) != (self.settings.agi.listen, self.settings.agi.workers, self.settings.store.path):
            log.warning("[agi] listen, [agi] workers and [store] path changes take effect only after a restart")
        self.settings = new
        if outputs_changed:
            try:
                task = asyncio.get_running_loop().create_task(self._restart_outputs())
                self.tasks.append(task)
            except RuntimeError:
                log.warning("[outputs] changes take effect after a restart")
        self.screener.reload(new)
        if self.reputation is not None and self.reputation_lookup is not None:
            self.reputation.reload(new.reputation)
            self.reputation_lookup.reload(new)
        elif new.reputation.active and self.store is not None and self.reputation_starting is None:
            self.reputation_starting = asyncio.get_running_loop().create_task(self._start_reputation(new))
            self.tasks.append(self.reputation_starting)
        for obs in self.observers:
            if isinstance(obs, DecisionLogger):
                obs.fmt = new.log_format
        logging.getLogger().setLevel(new.log_level.upper())
        log.info("config reloaded from %s", ", ".join(new.sources))
        return True

    async def stop(self) -> None:
        if self.ami is not None:
            await self.ami.close()
        if self.server is not None:
            await self.server.close()
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self._stop_outputs()
        if self.reputation is not None:
            await self.reputation.close()
            self.reputation = None
        if self.calllog is not None:
            await self.calllog.flush()
        if self.challenge_recorder is not None:
            await self.challenge_recorder.flush()
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


async def serve(config_path: str | None, *, workers: int | None = None, worker: int | None = None) -> None:
    """Run the service; with ``workers`` > 1 (or ``[agi] workers``) as a pool of processes."""
    settings = load_settings(config_path)
    setup_logging(settings.log_level)
    count = workers if workers is not None else settings.agi.workers
    if worker is None and count > 1:
        from .workers import WorkerPool

        log.info("edgefilter %s starting %d workers (pid %d), config: %s", _version(), count, os.getpid(), ", ".join(settings.sources))
        await WorkerPool(config_path, count, settings.agi.listen).run()
        return
    if worker is None:
        log.info("edgefilter %s starting (pid %d), config: %s", _version(), os.getpid(), ", ".join(settings.sources))
    else:
        log.info("edgefilter %s worker %d starting (pid %d)", _version(), worker, os.getpid())
    service = Service(settings, config_path=config_path, worker=worker)
    await service.start()
    await service.run_forever()


def _version() -> str:
    from . import __version__

    return __version__
