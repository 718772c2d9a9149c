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
from collections.abc import Callable

from edgefilter.asterisk.agi import AgiServer
from edgefilter.asterisk.ami import AmiListener, load_secret
from edgefilter.asterisk.appeals import ROUTE as APPEAL_ROUTE
from edgefilter.asterisk.appeals import AppealBook, AppealDesk, AppealNotifier, appeal_route
from edgefilter.asterisk.challenge import RESULT_ROUTE, ChallengeBook, ChallengeFailures, ChallengeRecorder
from edgefilter.asterisk.mirror import AmiClient, BlockMirror
from edgefilter.asterisk.outcomes import OutcomeTracker
from edgefilter.asterisk.routes import DecisionObserver, challenge_result_route, screen_route
from edgefilter.asterisk.starcodes import StarCodes
from edgefilter.calllog import CallLogWriter
from edgefilter.core.config import Settings, load_settings
from edgefilter.core.errors import AmiError, ConfigError
from edgefilter.core.model import NumberKind
from edgefilter.core.numbers import warm_up
from edgefilter.eventloop import running_loop_name
from edgefilter.follower import FULL_RELOAD_AFTER, SETTLE_HEAP_AFTER, ListFollower, settle_heap
from edgefilter.outputs.decisionlog import DecisionLogger, escape_text, setup_logging
from edgefilter.outputs.events import Output, build_udp_outputs
from edgefilter.reputation import ReputationClient, ReputationLookup
from edgefilter.rules.behaviour import BehaviourRules
from edgefilter.rules.memory import MemoryFollower
from edgefilter.rules.screen import Decision, Screener
from edgefilter.store.open import AnyStore, open_store
from edgefilter.store.spool import Spool
from edgefilter.store.sqlite import CallOutcome, ContactSeen
from edgefilter.systemd import Notifier

log = logging.getLogger("edgefilter.service")

__all__ = ["FULL_RELOAD_AFTER", "SETTLE_HEAP_AFTER", "CallLogWriter", "ListFollower", "Service", "serve", "settle_heap"]


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
        self.store: AnyStore | None = None
        self.spool: Spool | None = None
        self._store_cm: contextlib.AbstractAsyncContextManager[AnyStore] | None = None
        self._stopped = asyncio.Event()
        self.follower: ListFollower | None = None
        self.memory: MemoryFollower | None = None
        self._memory_loaded = False
        self.calllog: CallLogWriter | None = None
        self.outputs: list[Output] = []  # StatsD / syslog / Prometheus outputs ([outputs]); also observers
        self._outputs_lock = asyncio.Lock()
        self.challenges = ChallengeBook(lambda: self.settings)
        self.challenge_failures = ChallengeFailures(lambda: self.settings)
        self.screener.sources.append(self.challenge_failures)
        self.challenge_recorder: ChallengeRecorder | None = None
        # appeals (issue 17): offers on the call path (memory), the appeal route, notices
        self.appeals = AppealBook(lambda: self.settings, lambda: self.screener.index, redecide=self.screener.decide)
        self.appeal_desk: AppealDesk | None = None
        self.appeal_notifier = AppealNotifier(lambda: self.settings)
        self.appeals.count = self._count_appeal
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
        self.clock: Callable[[], float] = time.time  # maintenance's notion of now (tests inject one)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    async def start(self) -> None:
        s = self.settings
        secret = load_secret(s.ami) if s.ami.enabled else ""  # a bad secret file stops us here, clearly
        warm_up(s.default_region)
        self._store_cm = open_store(s, connect=False)
        self.store = await self._store_cm.__aenter__()
        self.spool = await Spool.open(s.store.spool_path, s.store.spool_max)
        if self.spool.count:
            log.info("call log spool %s holds %d records from before; writing them when the store answers", self.spool.path, self.spool.count)
        self.follower = ListFollower(self.store, self.screener)
        if s.ami.enabled and self.ami_client is None:
            self.ami = AmiListener(s.ami, secret, self.tracker.feed)
        ami_client = self.ami_client or self.ami
        if ami_client is not None and s.mirror.enabled and s.mirror.max_entries > 0 and not self.worker:
            self.mirror = BlockMirror(ami_client, lambda: self.settings, lambda: self.screener.index)
            self.follower.on_load.append(self.mirror.resync)
            self.follower.on_change.append(self.mirror.on_change)
        self.follower.on_change.append(self.appeals.on_list_change)
        self.follower.on_load.append(self.appeals.on_list_load)
        self.appeal_desk = AppealDesk(self.appeals, self._open_store, lambda: self.settings, node=s.store.node,
                                      notify=self.appeal_notifier, count=self._count_appeal)
        self.memory = MemoryFollower(self.store, self.behaviour, lambda: self.settings, s.store.node,
                                     clock=self.screener.clock, shared_node=self.worker is not None)
        if self.store.backend == "sqlite":
            await self.follower.load()  # a local file: failures here are for the admin, at once
            await self._load_memory()
            await self.appeal_desk.refresh()
        else:
            try:
                await asyncio.wait_for(self.follower.poll(), 15.0)  # migrate + load
                await asyncio.wait_for(self._load_memory(), 15.0)
                await asyncio.wait_for(self.appeal_desk.refresh(), 15.0)
            except Exception as e:
                reason = self.store.describe_error(e) if not isinstance(e, asyncio.TimeoutError) else f"{s.store.where}: no answer in 15 s"
                log.error("cannot load the lists or the call history (%s); screening without them until the database answers", reason)
        self.screener.sources.append(self.behaviour)
        self.calllog = CallLogWriter(self.store, self.spool, s.store.node)
        self.observers.extend([DecisionLogger(s.log_format), self.calllog, self._remember])
        await self._start_outputs(s)
        self.challenge_recorder = ChallengeRecorder(
            lambda: self.settings, lambda: self.screener.index, self.challenge_failures, self.store
        )
        if s.reputation.active:
            await self._start_reputation(s)
        starcodes = StarCodes(self._open_store, self.behaviour, lambda: self.settings, self.calllog.submit, clock=time.time)
        host, port = s.agi.listen
        self.server = AgiServer(
            {
                "screen": screen_route(self.screener, self.observers, self.challenges, self.appeals),
                RESULT_ROUTE: challenge_result_route(self.challenges, self.challenge_recorder),
                APPEAL_ROUTE: appeal_route(self.appeal_desk),
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
            asyncio.create_task(self.follower.run(lambda: self.settings.store.poll_interval)),
            asyncio.create_task(self.store.watch_changes(self.follower.wake, self.follower.resync)),
            asyncio.create_task(self.calllog.run()),
            asyncio.create_task(self._every(lambda: self.settings.outputs.gauge_interval, self._gauges, "gauges")),
            asyncio.create_task(self.challenge_recorder.run()),
            asyncio.create_task(self._every(lambda: 30.0, self._sweep_challenges, "challenge sweep")),
            asyncio.create_task(self.appeal_desk.run()),
            asyncio.create_task(self.appeal_notifier.run()),
        ]
        if not self.worker:  # one maintainer per database, not one per worker
            self.tasks.append(asyncio.create_task(self._every(lambda: 600.0, self._maintenance, "maintenance")))
        if self.store.backend != "sqlite" or self.worker is not None or not self._memory_loaded:
            # a shared store: other nodes' (or other workers') calls and refusals (a single
            # process has only its own)
            self.tasks.append(asyncio.create_task(
                self._every(lambda: max(self.settings.store.poll_interval, 0.25), self._follow_memory, "behaviour memory follower")))
        if self.mirror is not None:
            self.tasks.append(asyncio.create_task(self.mirror.run()))
            self.tasks.append(asyncio.create_task(self._every(lambda: 60.0, self._expire_mirror, "mirror expiry")))

    async def _start_outputs(self, s: Settings) -> None:
        """Start the configured outputs and observe decisions with them; a failing output is
        logged and left out: observability must never keep the filter from screening."""
        outputs: list[Output] = build_udp_outputs(s.outputs)
        if s.outputs.prometheus is not None:
            from edgefilter.outputs.prometheus import PrometheusOutput  # prometheus_client is loaded only when used

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

    async def _load_memory(self) -> None:
        """Fill the behaviour rules' memory (memory.MemoryFollower.load) and the challenge
        failures from the store."""
        assert self.store is not None and self.memory is not None
        s = self.settings
        await self.memory.load()
        self.challenge_failures.load(await self.store.challenge_failures_since(time.time() - s.challenge.fail_window))
        self._memory_loaded = True

    def _open_store(self) -> AnyStore:
        """The store opened by start(): star codes and appeals read it at each use, after start."""
        assert self.store is not None, "the store is opened in start()"
        return self.store

    async def _follow_memory(self) -> None:
        """Background: other nodes' calls, refusals and contacts (shared store), or the first
        load when the database was not there at start."""
        assert self.memory is not None
        if not self._memory_loaded:
            await self._load_memory()
        else:
            await self.memory.poll()

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
        from edgefilter.core.numbers import normalize

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
                    reason = self.store.describe_error(e) if self.store is not None else str(e)  # (started after the store)
                    log.warning("%s failed (%s); screening continues from memory", name, reason)
                failing = True

    async def _expire_mirror(self) -> None:
        assert self.mirror is not None
        self.mirror.expire()

    async def _sweep_challenges(self) -> None:
        self.challenges.sweep()
        self.appeals.sweep()

    def _count_appeal(self, event: str) -> None:
        """An appeal event (offered, declined, recorded...) to the metric outputs that count them."""
        for out in self.outputs:
            count = getattr(out, "appeal", None)
            if count is not None:
                try:
                    count(event)
                except Exception:
                    log.exception("[outputs] %s: appeal counter failed", out.name)

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
        await self.store.purge_challenges(time.time() - self.settings.challenge.fail_window)
        if self.appeal_desk is not None:
            await self.appeal_desk.purge(time.time())
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
        old = self.settings.store
        restart_keys = (new.agi.listen, new.agi.workers, new.agi.max_env_bytes, new.agi.event_loop, new.store.path, new.store.url,
                        new.store.spool_path, new.store.spool_max, new.store.node, new.store.busy_timeout,
                        new.store.password_file, new.mirror.enabled)
        if restart_keys != (self.settings.agi.listen, self.settings.agi.workers, self.settings.agi.max_env_bytes,
                            self.settings.agi.event_loop, old.path,
                            old.url, old.spool_path, old.spool_max, old.node, old.busy_timeout, old.password_file,
                            self.settings.mirror.enabled):
            log.warning("[agi] listen/workers/max_env_bytes/event_loop, [store] path/url/spool_path/spool_max/node/busy_timeout/"
                        "password_file and [mirror] enabled changes take effect only after a restart")
        if self.server is not None:  # read per connection: the next one obeys them
            self.server.set_limits(allow_peers=new.agi.allow_peers, read_timeout=new.agi.read_timeout,
                                   max_sessions=new.agi.max_sessions)
        outputs_changed = new.outputs != self.settings.outputs
        if new.ami != self.settings.ami:
            log.warning("[ami] changes take effect only after a restart")
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


async def serve(
    config_path: str | None, *, workers: int | None = None, worker: int | None = None, settings: Settings | None = None
) -> None:
    """Run the service; with ``workers`` > 1 (or ``[agi] workers``) as a pool of processes.
    ``settings``: already loaded from ``config_path`` (the CLI reads them first to choose the
    event loop)."""
    settings = settings or load_settings(config_path)
    setup_logging(settings.log_level)
    count = workers if workers is not None else settings.agi.workers
    if worker is None and count > 1:
        from edgefilter.workers import WorkerPool

        log.info("edgefilter %s starting %d workers (pid %d), config: %s", _version(), count, os.getpid(), ", ".join(settings.sources))
        notifier = Notifier()
        pinging = asyncio.get_running_loop().create_task(notifier.watchdog()) if notifier.enabled else None
        notifier.notify("READY=1")
        try:
            await WorkerPool(config_path, count, settings.agi.listen).run()
        finally:
            if pinging is not None:
                pinging.cancel()
            notifier.close()
        return
    if worker is None:
        log.info("edgefilter %s starting (pid %d, %s), config: %s", _version(), os.getpid(), running_loop_name(),
                 ", ".join(settings.sources))
    else:
        log.info("edgefilter %s worker %d starting (pid %d, %s)", _version(), worker, os.getpid(), running_loop_name())
    service = Service(settings, config_path=config_path, worker=worker)
    await service.start()
    notifier = Notifier()
    if notifier.enabled and worker is None:
        notifier.notify("READY=1")
        service.tasks.append(asyncio.get_running_loop().create_task(notifier.watchdog()))
    try:
        await service.run_forever()
    finally:
        notifier.notify("STOPPING=1")
        notifier.close()


def _version() -> str:
    from edgefilter import __version__

    return __version__
