"""The behaviour rules' memory, loaded from the store and kept in step with the other nodes.

The behaviour rules (RATE_*, RANGE_CAMPAIGN, REFUSED_BEFORE, KNOWN_CONTACT) read only the
in-memory CallHistory: no I/O on the call path. A single box feeds it from its own decisions
(service._remember) and star codes. Several PBXs sharing one PostgreSQL store must also see each
other's calls and refusals, or a burst spread over two nodes never escalates and a number refused
on one node rings through on the other; so must the workers of one pool (``[agi] workers``), on
SQLite too. ``MemoryFollower.poll`` runs in the background (never on
the call path) and brings in:

- other nodes' calls, by following ``calls_after(cursor)`` (ids commit in order, see store/pg_calls.py),
  skipping this node's own rows, which _remember already put in memory (the workers of one pool
  share a node name: there a row is skipped only when its call is already in memory);
- the refusal ledger, re-read whenever ``refusals_version`` changes (a refusal recorded or undone
  on any node), replacing the refusals in force;
- known contacts recorded lately by any node.

Not followed: AMI outcomes (answered, talk time) of other nodes' calls arrive as updates of rows
already read, so RATE_SHORT counts only outcomes this node saw (and those loaded at start).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from edgefilter.core.config import Settings
from edgefilter.core.model import Number, NumberKind
from edgefilter.rules.behaviour import KEYED_KINDS, RANG_ACTIONS, BehaviourRules, block_of
from edgefilter.rules.history import RecentCall
from edgefilter.store.sqlite import CallRecord

log = logging.getLogger("edgefilter.memory")

#: Calls read per query while catching up.
BATCH = 5000
#: Contacts are re-read from this far before the last poll: another node writes them through its
#: call-log queue (and its spool during an outage), so they land a little after their time.
CONTACT_SLACK = 120.0


def recent_call(ts: float, uniqueid: str, e164: str | None, kind: str, target: str, answered, talk,
                action: str, block_digits: int) -> RecentCall:
    """A stored call as the behaviour rules remember it (the same shape as a live decision's)."""
    try:
        nk = NumberKind(kind)
    except ValueError:
        nk = NumberKind.GARBAGE
    num = Number("", nk, e164)
    return RecentCall(ts, uniqueid, e164 if nk in KEYED_KINDS else None, target, block_of(num, block_digits),
                      None if answered is None else bool(answered), talk, action in RANG_ACTIONS)


class MemoryFollower:
    """Loads the behaviour memory from the store, then follows what other nodes add to it."""

    def __init__(self, store, behaviour: BehaviourRules, settings: Callable[[], Settings], node: str,
                 clock: Callable[[], float] = time.time, *, shared_node: bool = False) -> None:
        self.store = store
        self.behaviour = behaviour
        self.settings = settings
        self.node = node
        #: other processes write rows under this node's name too (the workers of one pool): a row
        #: of this node is ours only when its call is already in memory
        self.shared_node = shared_node
        self.clock = clock
        self.loaded = False
        self.cursor = 0  # largest call id read
        self.refusals_seen: tuple | None = None
        self.contacts_mark = 0.0
        self.calls_applied = 0  # other nodes' calls brought in (tests, logs)
        self.refusal_reloads = 0

    async def load(self) -> None:
        """Fill the memory: recent calls (every node's), last caller per extension, refusals in
        force, known contacts; then follow from the newest call id read."""
        t0 = time.perf_counter()
        b = self.settings().behaviour
        h = self.behaviour.history
        now = self.clock()
        head = await self.store.calls_head()  # read first: calls_after(head) then misses nothing
        for ts, uid, e164, kind, called, exten, answered, talk, action in await self.store.history_rows(
            now - b.horizon, b.memory_calls, through_id=head
        ):
            if uid and h.by_uniqueid(uid) is not None:
                continue  # decided here while the database was away (a late first load): known
            h.add(recent_call(ts, uid, e164, kind, exten or called, answered, talk, action, b.campaign_block_digits), now)
        for exten, ts, uid, e164, _called in await self.store.last_callers():
            h.last_by_target.setdefault(exten, RecentCall(ts, uid, e164, exten))
        version = await self.store.refusals_version()
        active = await self.store.refusals(active_only=True)
        h.replace_refusals((r.caller_e164, r.callee) for r in active)
        for e164, ts in await self.store.contacts(now - b.known_contact_ttl):
            h.add_contact(e164, ts)
        self.cursor, self.refusals_seen, self.contacts_mark = head, version, now
        self.loaded = True
        log.info("behaviour memory: %d recent calls, %d extensions, %d refusals, %d contacts in %.0f ms",
                 len(h), len(h.last_by_target), len(active), len(h.contacts), (time.perf_counter() - t0) * 1000)

    async def poll(self) -> int:
        """Bring in what other nodes wrote since the last poll; returns how many calls."""
        if not self.loaded:
            await self.load()
            return 0
        b = self.settings().behaviour
        h = self.behaviour.history
        now = self.clock()
        added = 0
        while True:
            rows = await self.store.calls_after(self.cursor, BATCH)
            for rowid, rec in rows:
                self.cursor = rowid
                if rec.node == self.node and (not self.shared_node or (rec.uniqueid and h.by_uniqueid(rec.uniqueid) is not None)):
                    continue  # ours: already in memory since its decision
                h.add(self._from_record(rec, b.campaign_block_digits), now)
                added += 1
            if len(rows) < BATCH:
                break
        if not rows and self.cursor and (head := await self.store.calls_head()) < self.cursor:
            # ids went back: the table was emptied and refilled (SQLite reuses ids once every
            # row is purged) or the database replaced; every row there now is new to us
            log.info("call ids went back (%d < %d): following from the start", head, self.cursor)
            self.cursor = 0
        self.calls_applied += added
        version = await self.store.refusals_version()
        if version != self.refusals_seen:
            active = await self.store.refusals(active_only=True)
            h.replace_refusals((r.caller_e164, r.callee) for r in active)
            self.refusals_seen = version
            self.refusal_reloads += 1
        since = self.contacts_mark - CONTACT_SLACK
        for e164, ts in await self.store.contacts(since):
            h.add_contact(e164, ts)
        self.contacts_mark = now
        return added

    @staticmethod
    def _from_record(rec: CallRecord, block_digits: int) -> RecentCall:
        return recent_call(rec.ts, rec.uniqueid, rec.caller_e164, rec.caller_kind, rec.extension or rec.called,
                           None, None, rec.action, block_digits)
