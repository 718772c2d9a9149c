"""The list follower: keeps the in-memory index in step with the database's change feed.

Split out of service.py (issue 18); ``edgefilter.service`` re-exports these names. The logger
stays "edgefilter.service": log lines read as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable

from edgefilter.lists.index import Entry, Pattern
from edgefilter.rules.screen import Screener
from edgefilter.store.open import AnyStore
from edgefilter.store.sqlite import MERGE_MAX_BEHIND, apply_changed

log = logging.getLogger("edgefilter.service")

FULL_RELOAD_AFTER = 20000  # changes behind: cheaper to merge them (or reload) than to replay them
SETTLE_HEAP_AFTER = 50000  # list entries from which settle_heap runs a full collection first


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
        #: called with (list, pattern text, entry or None) after each change is applied
        self.on_change: list[Callable[[str, str, Entry | None], None]] = []
        #: called after a full (re)load of the index
        self.on_load: list[Callable[[], None]] = []
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
        # SQLite: a worker thread with its own connection (calls keep being answered meanwhile);
        # both stores load exact numbers as compact arrays and start from a snapshot file
        rev, index = await self.store.load_index()
        self.screener.index = index
        self.rev = rev
        self.loaded = True
        del index
        settle_heap(collect=self.screener.index.size >= SETTLE_HEAP_AFTER)
        log.info("loaded %d list entries in %.0f ms (rev %d)", self.screener.index.size, (time.perf_counter() - t0) * 1000, rev)
        for hook in self.on_load:
            hook()
        return self.screener.index.size

    async def merge_big_batch(self) -> bool:
        """A batch too big to replay one by one (an import while the service runs): the entries
        changed since are read once, as they are now; the numbers new to the compact arrays are
        merged into new arrays in a worker thread (calls keep being answered from the current
        ones) and swapped in; the few other changes are applied in place. Much cheaper than a
        full reload beside millions of entries. False (the caller reloads) when the batch is
        beyond MERGE_MAX_BEHIND changes."""
        head = await self.store.head_rev()
        if head - self.rev > MERGE_MAX_BEHIND:
            return False
        t0 = time.perf_counter()
        rev, rows, profiles = await self.store.changed_entries(self.rev)
        index = self.screener.index
        plan = await asyncio.to_thread(index.plan_merge, rows, profiles)
        if index is not self.screener.index:  # replaced meanwhile (never by design): start over
            return False
        rest = index.adopt_merge(plan)
        for i in range(0, len(rest), 2000):  # a long tail of updates must not hold calls up
            apply_changed(index, rest[i:i + 2000])
            await asyncio.sleep(0)
        self.rev = rev
        self.applied += len(rows)
        log.info("merged %d changed list entries in %.0f ms (rev %d, %d entries)", len(rows),
                 (time.perf_counter() - t0) * 1000, rev, index.size)
        for hook in self.on_load:  # as after a reload: listeners resynchronise from the index
            hook()
        return True

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
        # The head revision first: one cheap query (one hop to SQLite's thread) when nothing
        # changed, which is almost every poll, several times a second.
        head = await self.store.head_rev()
        if head <= self.rev:
            if head < self.rev:  # the database was replaced or rebuilt under us
                log.warning("change feed went backwards (%d < %d): reloading all lists", head, self.rev)
                await self.load()
            return 0
        changes = await self.store.changes_since(self.rev, FULL_RELOAD_AFTER + 1)
        if not changes:
            return 0
        if len(changes) > FULL_RELOAD_AFTER:
            if not await self.merge_big_batch():
                await self.load()
            return len(changes)
        index = self.screener.index
        for rev, _op, list_name, pattern_text, entry in changes:
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
