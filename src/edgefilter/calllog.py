"""The call log writer: call records, AMI outcomes and known contacts to the store in batches,
through an on-disk spool while the store fails.

Split out of service.py (issue 18); ``edgefilter.service`` re-exports ``CallLogWriter``. The
logger stays "edgefilter.service": log lines read as before.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
import uuid

from edgefilter.rules.screen import Decision
from edgefilter.store.open import AnyStore
from edgefilter.store.spool import Spool
from edgefilter.store.sqlite import CallOutcome, CallRecord

log = logging.getLogger("edgefilter.service")


class CallLogWriter:
    """Bounded queue of call records written in batches; never blocks or fails a call.

    AMI outcomes and known contacts go through the same queue, so an outcome is always written
    after the insert of its call (and, during an outage, spooled behind it).

    When the store cannot take a batch, it goes to the on-disk spool (bounded by count) and so do
    the batches after it, in order, until a drain (retried with backoff) has emptied the spool
    into the store. Each record carries a unique key, so a batch written twice is stored once.
    """

    def __init__(
        self, store: AnyStore, spool: Spool, node: str = "", maxsize: int = 10000, batch: int = 500, interval: float = 0.25
    ) -> None:
        self.store = store
        self.spool = spool
        self.node = node
        self.queue: asyncio.Queue[object] = asyncio.Queue(maxsize)
        self.batch = batch
        # Pause between batches. Every batch is several hops to the SQLite thread, and each hop
        # hands it the GIL while calls wait: at 50 ms the profile showed the event loop stalled
        # in those hand-offs about 2.5% of the time, in bursts that reached the p99.
        self.interval = interval
        self.dropped = 0
        self.written = 0
        self.queued = 0  # taken into the queue; at rest, queued == written + dropped + spooled
        # Keys unique across nodes and restarts without a system call per record: 80 random
        # bits per process, then a counter (32 hex digits, like the uuid4 keys of before).
        prefix = uuid.uuid4().hex[:20]
        self._keys = (f"{prefix}{n:012x}" for n in itertools.count())
        self.failing = False
        self.failures = 0  # failed attempts to write (each backs off further, up to max_delay)
        self.max_delay = 5.0
        self._delay = 0.0
        self._next_try = 0.0

    def __call__(self, d: Decision) -> None:
        """Queue a decided call. Its CallRecord is built when its batch is taken, off the call
        path: in a batch the code finds the CPU's caches warm (at ordinary rates every call
        starts cold), and the queue keeps it in order with the outcomes submitted after it."""
        self._put((time.time(), d))

    def _record(self, ts: float, d: Decision) -> CallRecord:
        v = d.verdict
        return CallRecord(  # node + a unique key: a retried write (spool drain) is stored once
            ts=ts,
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
            key=next(self._keys),
        )

    def submit(self, rec: object) -> None:
        """Queue a CallRecord, CallOutcome or ContactSeen; dropped (and counted) when full.
        An outcome is stamped with this node: on a shared store it updates this node's call only."""
        if isinstance(rec, CallOutcome) and not rec.node:
            rec = dataclasses.replace(rec, node=self.node)
        self._put(rec)

    def _put(self, item: object) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped in (1, 100) or self.dropped % 10000 == 0:
                log.warning("call log queue full: %d records dropped (store too slow or failing)", self.dropped)
        else:
            self.queued += 1

    def _take(self, first: object | None = None) -> list[object]:
        pending = [first] if first is not None else []
        while len(pending) < self.batch and not self.queue.empty():
            pending.append(self.queue.get_nowait())
        return [self._record(*item) if type(item) is tuple else item for item in pending]

    async def run(self) -> None:
        while True:
            if self.spool.count:  # a backlog: wake up to retry the drain even with no new calls
                wait = max(0.05, self._next_try - time.monotonic())
                try:
                    pending = self._take(await asyncio.wait_for(self.queue.get(), wait))
                except TimeoutError:
                    pending = []
            else:
                pending = self._take(await self.queue.get())
            await self.write(pending)
            await asyncio.sleep(self.interval)

    async def write(self, pending: list[object]) -> None:
        """Store a batch, or spool it behind the backlog; then try to drain the backlog."""
        if pending and not self.spool.count and not self.failing:
            try:
                self.written += await self.store.write_batch(pending)
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
                self.written += await self.store.write_batch([r for _, r in rows])
            except Exception as e:
                self._failed(e)
                return
            await self.spool.remove_through(rows[-1][0])  # only after the store committed them
            moved += len(rows)
        if self.failing or moved:
            log.info("call log writes recovered: %s takes records again; %d buffered items (calls, outcomes, contacts) written", self.store.where, moved)
        self.failing, self._delay, self._next_try = False, 0.0, 0.0

    async def _to_spool(self, records: list[object]) -> None:
        try:
            dropped = await self.spool.add(records)
        except Exception as e:
            dropped = len(records)
            log.error("call log spool %s failed (%s): %d call-log items lost", self.spool.path, e, dropped)
        if dropped:
            self.dropped += dropped
            log.warning("call log spool %s full (%d items): %d call-log items dropped", self.spool.path, self.spool.max_records, dropped)

    def _failed(self, e: BaseException) -> None:
        self.failures += 1
        self._delay = min(max(self._delay * 2, 0.5), self.max_delay)
        self._next_try = time.monotonic() + self._delay
        if not self.failing:  # once per outage, not per retry
            log.warning(
                "call log write failed (%s); buffering call records, outcomes and contacts in %s, "
                "retrying with backoff; screening continues",
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
                self.written += await asyncio.wait_for(self.store.write_batch(rest), timeout)
                return
            except Exception as e:
                self._failed(e)
        await self._to_spool(rest)
