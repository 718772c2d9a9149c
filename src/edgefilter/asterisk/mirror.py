"""Hard blocks mirrored into Asterisk's database, so they stay blocked while the service is down.

When the FastAGI service does not answer (AGISTATUS FAILURE) the dial plan lets calls ring, but
first checks ``${DB_EXISTS(edgefilter-block/<digits>)}``: this module keeps that AstDB family
equal to the service's hard blocks through AMI ``DBPut`` / ``DBDel`` (``DBDelTree`` + a full put
on a resync). A hard block is an exact number whose verdict is always reject whatever else is
known: a blocklist entry without category (LIST_BLOCKED forces reject) or whose category forces
reject at all hours, and that no exact allow entry outranks. Prefixes and masks are not mirrored
(the dial plan can only look up exact keys). The key is the E.164 digits without '+', what the
dial plan has after FILTER() and stripping '+' / '00'.

The mirror is bounded (``[mirror] max_entries``; the newest entries win) and never on the call
path: changes are coalesced per key and sent by one background task, retried while AMI is down.
It only needs an object with ``async send_action(action: dict) -> dict`` (the AMI client).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from edgefilter.core.config import Settings
from edgefilter.core.model import Action
from edgefilter.lists.index import Entry, ListIndex, Pattern

log = logging.getLogger("edgefilter.mirror")

#: Replies that mean "already gone" for DBDel / DBDelTree: fine for a mirror.
_NOT_FOUND = ("not found", "no such", "failed to delete")


class AmiClient(Protocol):
    async def send_action(self, action: dict) -> dict: ...


class MirrorError(Exception):
    """AMI refused an action for a reason retrying will not fix soon (e.g. no write=system)."""


def hard_block_value(entry: Entry, settings: Settings) -> str | None:
    """The AstDB value for a hard block (its category, or "block"); None if not a hard block."""
    if entry.list != "block" or entry.pattern.kind != "exact":
        return None
    if entry.category:
        cat = settings.categories.get(entry.category)
        if cat is None or cat.force is not Action.REJECT or cat.schedule is not None:
            return None
        return entry.category
    rule = settings.rules.get("LIST_BLOCKED")
    if rule is None or not rule.enabled or rule.force is not Action.REJECT:
        return None
    return "block"


class BlockMirror:
    """Desired AstDB state for the hard blocks, and the task that makes Asterisk match it."""

    def __init__(
        self,
        ami: AmiClient,
        settings: Callable[[], Settings],
        index: Callable[[], ListIndex],
        *,
        clock: Callable[[], float] = time.time,
        retry_after: float = 2.0,
    ) -> None:
        self.ami = ami
        self._settings = settings
        self._index = index
        self.clock = clock
        self.retry_after = retry_after
        #: key -> (value, created_at, expires_at), oldest first: what Asterisk should hold
        self.mirrored: OrderedDict[str, tuple[str, float, float | None]] = OrderedDict()
        #: key -> value to put, or None to delete; coalesced, sent in order
        self.pending: OrderedDict[str, str | None] = OrderedDict()
        self.deltree = False
        self._resync = False
        self._dirty: set[str] | None = None  # keys changed during a rebuild
        self.evicted = 0
        self.sent = 0
        self.failures = 0
        self._wake = asyncio.Event()

    @property
    def family(self) -> str:
        return self._settings().mirror.family

    @property
    def limit(self) -> int:
        return self._settings().mirror.max_entries

    # -- desired state -----------------------------------------------------------------
    def _desired(self, key: str, now: float, settings: Settings | None = None) -> tuple[str, Entry] | None:
        """The exact entries decide: an exact number outranks every prefix and mask, and an exact
        allow beats an exact block (lists.ListIndex.lookup), so no other entry can matter."""
        block = None
        for e in self._index().exact(key):
            if not e.active(now):
                continue
            if e.list == "allow":
                return None
            block = e
        if block is None:
            return None
        value = hard_block_value(block, settings or self._settings())
        return (value, block) if value is not None else None

    def resync(self) -> None:
        """Recompute everything (start-up, full reload): wipe the family, put the newest hard blocks.

        Only asks: the scan runs in the background task, in slices that yield to the event loop,
        so a big blocklist never stalls calls."""
        self._resync = True
        self._wake.set()

    async def _rebuild(self, slice_size: int = 5000) -> int:
        self._resync = False
        self._dirty = set()
        now = self.clock()
        settings = self._settings()
        found = []
        for n, key in enumerate(self._index().exact_keys(), 1):
            d = self._desired(key, now, settings)
            if d is not None:
                found.append((d[1].created_at, key, d[0], d[1].expires_at))
            if n % slice_size == 0:
                await asyncio.sleep(0)
        found.sort()
        limit = self.limit
        if len(found) > limit:
            self.evicted += len(found) - limit
            log.warning("%d hard blocks, [mirror] max_entries = %d: mirroring the newest only", len(found), limit)
            found = found[len(found) - limit:] if limit else []
        self.mirrored = OrderedDict((key, (value, created, expires)) for created, key, value, expires in found)
        self.pending = OrderedDict((key, value) for key, (value, _, _) in self.mirrored.items())
        self.deltree = True
        dirty, self._dirty = self._dirty, None
        for key in dirty:  # changed while we scanned
            self._refresh(key)
        return len(self.mirrored)

    def on_change(self, list_name: str, pattern_text: str, entry: object) -> None:
        """A list change already applied to the index (from the change feed)."""
        pattern = Pattern.from_text(pattern_text)
        if pattern.kind != "exact":
            return
        if self._dirty is not None:
            self._dirty.add(pattern.key)
        self._refresh(pattern.key)

    def _refresh(self, key: str) -> None:
        d = self._desired(key, self.clock())
        if d is None:
            if self.mirrored.pop(key, None) is not None:
                self._queue(key, None)
            return
        value, entry = d
        if self.limit <= 0:
            return
        old = self.mirrored.pop(key, None)
        self.mirrored[key] = (value, entry.created_at, entry.expires_at)
        if old is None or old[0] != value:
            self._queue(key, value)
        while len(self.mirrored) > self.limit:
            oldest, _ = self.mirrored.popitem(last=False)
            self.evicted += 1
            if self.evicted in (1, 100) or self.evicted % 10000 == 0:
                log.warning("[mirror] max_entries = %d reached: %d older hard blocks dropped from AstDB", self.limit, self.evicted)
            self._queue(oldest, None)

    def expire(self) -> int:
        """Drop mirrored entries whose block expired (the purge that deletes them runs rarely)."""
        now = self.clock()
        gone = [k for k, (_, _, exp) in self.mirrored.items() if exp is not None and exp <= now]
        for key in gone:
            self._refresh(key)
        return len(gone)

    def _queue(self, key: str, value: str | None) -> None:
        self.pending.pop(key, None)
        self.pending[key] = value
        self._wake.set()

    # -- talking to Asterisk -----------------------------------------------------------
    async def _send(self, action: dict) -> None:
        reply = await self.ami.send_action(action)
        response = str(reply.get("Response", "")).lower()
        if response == "success":
            self.sent += 1
            return
        message = str(reply.get("Message", ""))
        if action["Action"] in ("DBDel", "DBDelTree") and any(s in message.lower() for s in _NOT_FOUND):
            self.sent += 1
            return
        raise MirrorError(f"{action['Action']} refused: {message or reply}")

    async def flush(self) -> int:
        """Send everything pending; raises (leaving the rest pending) on the first failure."""
        done = 0
        if self._resync:
            await self._rebuild()
        if self.deltree:
            await self._send({"Action": "DBDelTree", "Family": self.family})
            self.deltree = False
        while self.pending:
            key, value = next(iter(self.pending.items()))
            if value is None:
                await self._send({"Action": "DBDel", "Family": self.family, "Key": key})
            else:
                await self._send({"Action": "DBPut", "Family": self.family, "Key": key, "Val": value})
            if self.pending.get(key, object()) == value:  # unchanged while we were sending
                del self.pending[key]
            done += 1
        return done

    async def run(self) -> None:
        """Background task: send changes as they come; back off while AMI fails."""
        delay = self.retry_after
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
                delay = self.retry_after
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.failures += 1
                if self.failures in (1, 10) or self.failures % 100 == 0:
                    log.warning("AstDB mirror: %s; %d changes pending, retrying in %.0f s", e, len(self.pending) + self.deltree, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
                self._wake.set()
