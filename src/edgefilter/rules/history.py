"""The in-memory memory of recent calls, known contacts and refusals: what the behaviour rules read.

The call path must not do I/O, so the facts the behaviour rules need live here: a bounded,
time-windowed history (loaded from the store at start, fed by every decision and by AMI
outcomes), the set of known contacts and the refusal ledger in force. Pure data structures, no
clock of their own: every method takes ``now`` so tests pin time instead of sleeping.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

K = TypeVar("K")

#: Per-number and per-block queues are bounded too, so one flooding number costs O(this).
PER_KEY_LIMIT = 2000


@dataclass(slots=True)
class RecentCall:
    """One screened inbound call as the behaviour rules see it; outcome fields filled later."""

    ts: float
    uniqueid: str
    caller: str | None  # E.164 (or short-number digits); None when there is nothing to key on
    target: str  # the extension or DID the call was for (RATE_SPREAD, refusals, last caller)
    block: str | None = None  # number block key (RANGE_CAMPAIGN), valid numbers only
    answered: bool | None = None  # None until an outcome is known
    talk_seconds: float | None = None
    rang: bool = True  # we let it ring (allow/tag); a call we rejected says nothing about the caller's hang-ups


class CallHistory:
    """Recent calls indexed by caller, number block, target and uniqueid; bounded in count and age."""

    def __init__(self, horizon: float, max_calls: int) -> None:
        self.horizon = horizon
        self.max_calls = max_calls
        self._all: deque[RecentCall] = deque()
        # Plain lists, not deques: most numbers call once, and an empty deque costs ~600 bytes.
        self._by_caller: dict[str, list[RecentCall]] = {}
        self._by_block: dict[str, list[RecentCall]] = {}
        self._by_uid: dict[str, RecentCall] = {}
        self.last_by_target: dict[str, RecentCall] = {}  # newest caller per extension (star codes)
        self.contacts: dict[str, float] = {}  # E.164 -> last time known (outbound or talked)
        self._refused: dict[tuple[str, str], int] = {}  # (caller, callee) -> active refusals
        self._refused_any: dict[str, int] = {}  # caller -> active refusals to anyone

    def __len__(self) -> int:
        return len(self._all)

    # -- calls --------------------------------------------------------------------------
    def add(self, call: RecentCall, now: float) -> None:
        """Remember a call. Calls normally come in time order; one that does not (another node's,
        read from a shared store a moment later) is put in its place, so every index stays in
        time order and the window scans stay exact."""
        if self._all and call.ts < self._all[-1].ts:
            i = len(self._all)
            while i > 0 and self._all[i - 1].ts > call.ts:
                i -= 1
            self._all.insert(i, call)
        else:
            self._all.append(call)
        if call.caller:
            self._push(self._by_caller, call.caller, call)
            if call.target:
                last = self.last_by_target.get(call.target)
                if last is None or last.ts <= call.ts:
                    self.last_by_target[call.target] = call
        if call.block:
            self._push(self._by_block, call.block, call)
        if call.uniqueid:
            self._by_uid[call.uniqueid] = call
        self.expire(now)

    @staticmethod
    def _push(index: dict[str, list[RecentCall]], key: str, call: RecentCall) -> None:
        q = index.get(key)
        if q is None:
            index[key] = [call]
            return
        i = len(q)
        while i > 0 and q[i - 1].ts > call.ts:  # a late arrival (see add); usually no step at all
            i -= 1
        q.insert(i, call)
        if len(q) > PER_KEY_LIMIT:
            del q[0]

    def expire(self, now: float) -> None:
        """Forget calls older than the horizon, and the oldest past ``max_calls``."""
        cutoff = now - self.horizon
        while self._all and (self._all[0].ts < cutoff or len(self._all) > self.max_calls):
            old = self._all.popleft()
            for index, key in ((self._by_caller, old.caller), (self._by_block, old.block)):
                if key is None:
                    continue
                q = index.get(key)
                if q is not None:
                    if q and q[0] is old:  # same time order as _all, unless the limit pushed it out
                        del q[0]
                    if not q:
                        del index[key]
            if old.uniqueid and self._by_uid.get(old.uniqueid) is old:
                del self._by_uid[old.uniqueid]

    def from_caller(self, caller: str, since: float) -> Iterator[RecentCall]:
        """This number's calls at or after ``since``, newest first."""
        for c in reversed(self._by_caller.get(caller, ())):
            if c.ts < since:
                break
            yield c

    def has_calls(self, caller: str) -> bool:
        """Whether any call of this number is remembered: most callers are new, and then the
        behaviour rules need not scan (and build generators for) empty windows."""
        return caller in self._by_caller

    def has_block_calls(self, block: str) -> bool:
        return block in self._by_block

    def from_block(self, block: str, since: float) -> Iterator[RecentCall]:
        for c in reversed(self._by_block.get(block, ())):
            if c.ts < since:
                break
            yield c

    def by_uniqueid(self, uniqueid: str) -> RecentCall | None:
        return self._by_uid.get(uniqueid)

    def set_outcome(self, uniqueid: str, answered: bool | None, talk_seconds: float | None) -> RecentCall | None:
        c = self._by_uid.get(uniqueid)
        if c is not None:
            if answered is not None:
                c.answered = answered
            if talk_seconds is not None:
                c.talk_seconds = talk_seconds
        return c

    # -- known contacts ---------------------------------------------------------------------
    def add_contact(self, e164: str, ts: float) -> None:
        if ts > self.contacts.get(e164, float("-inf")):
            self.contacts[e164] = ts

    def known_since(self, e164: str) -> float | None:
        return self.contacts.get(e164)

    # -- refusals ---------------------------------------------------------------------------
    def refuse(self, caller: str, callee: str) -> None:
        key = (caller, callee)
        self._refused[key] = self._refused.get(key, 0) + 1
        self._refused_any[caller] = self._refused_any.get(caller, 0) + 1

    def unrefuse(self, caller: str, callee: str) -> None:
        _one_less(self._refused, (caller, callee))
        _one_less(self._refused_any, caller)

    def refused(self, caller: str, callee: str | None) -> bool:
        """Refused by this callee, or by anyone when ``callee`` is None."""
        if callee is None:
            return caller in self._refused_any
        return (caller, callee) in self._refused

    def load_refusals(self, pairs: Iterable[tuple[str, str]]) -> None:
        for caller, callee in pairs:
            self.refuse(caller, callee)

    def replace_refusals(self, pairs: Iterable[tuple[str, str]]) -> None:
        """The refusals in force, as the shared ledger now says (other nodes' star codes too)."""
        self._refused.clear()
        self._refused_any.clear()
        self.load_refusals(pairs)


def _one_less(index: dict[K, int], k: K) -> None:
    """One active refusal fewer under ``k``; the key goes when none is left."""
    n = index.get(k, 0) - 1
    if n > 0:
        index[k] = n
    else:
        index.pop(k, None)
