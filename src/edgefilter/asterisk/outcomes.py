"""Call outcomes from AMI events: was a screened call answered, how long did it talk, why did it end.

The FastAGI env block gives the screened channel's uniqueid; AMI events carry Uniqueid and
Linkedid, so every channel of the same call (the Dial()ed phone, Local channel halves) joins the
screened one through its linkedid. Read classes (see asterisk-conf/manager-edgefilter.conf):
``call`` brings Newchannel, Newstate, DialBegin/DialEnd and Hangup with Cause; ``cdr`` adds Cdr
events, which when present give the billable seconds directly. Pure: events in, outcomes out,
time from an injected clock.
"""

from __future__ import annotations

import fnmatch
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from edgefilter.store.sqlite import CallOutcome

TRACK_LIMIT = 20000  # calls followed at once; a stuck one is forgotten after this many newer
LINK_LIMIT = 50000  # uniqueid -> linkedid pairs remembered for calls not (yet) registered


@dataclass
class _Tracked:
    uniqueid: str
    linkedid: str = ""
    answered_at: float | None = None
    dial_status: str = ""
    done: bool = False


class OutcomeTracker:
    """Follows registered (screened) calls through AMI events and emits a CallOutcome when each
    ends (Hangup of the screened channel), and again when a late Cdr refines it."""

    def __init__(
        self,
        emit: Callable[[CallOutcome], None],
        *,
        clock: Callable[[], float],
        outbound: Callable[[str, float], None] | None = None,
        outbound_contexts: Callable[[], tuple[str, ...]] = lambda: (),
    ) -> None:
        self.emit = emit
        self.clock = clock
        self.outbound = outbound
        self.outbound_contexts = outbound_contexts
        self._calls: OrderedDict[str, _Tracked] = OrderedDict()  # by screened uniqueid
        self._by_link: dict[str, _Tracked] = {}
        self._links: OrderedDict[str, str] = OrderedDict()  # any uniqueid -> linkedid seen
        self.events = 0

    def register(self, uniqueid: str, linkedid: str = "") -> None:
        """A call was screened; follow it."""
        if not uniqueid or uniqueid in self._calls:
            return
        t = _Tracked(uniqueid, linkedid or self._links.get(uniqueid, ""))
        self._calls[uniqueid] = t
        if t.linkedid:
            self._by_link[t.linkedid] = t
        while len(self._calls) > TRACK_LIMIT:
            _, old = self._calls.popitem(last=False)
            if self._by_link.get(old.linkedid) is old:
                del self._by_link[old.linkedid]

    def _find(self, uid: str, link: str) -> _Tracked | None:
        if uid:
            t = self._calls.get(uid)
            if t is not None:
                if link and not t.linkedid:
                    t.linkedid = link
                    self._by_link[link] = t
                return t
        if link:
            return self._by_link.get(link)
        return None

    def _remember(self, uid: str, link: str) -> None:
        if uid and link and uid not in self._links:
            self._links[uid] = link
            if len(self._links) > LINK_LIMIT:
                self._links.popitem(last=False)

    def feed(self, ev: Mapping[str, str]) -> None:
        """One AMI event (a panoramisk Message or a plain dict)."""
        self.events += 1
        name = str(ev.get("Event", "")).lower()
        now = self.clock()
        if name == "dialbegin":
            self._outbound(ev, now)
            uid, link = ev.get("Uniqueid", ""), ev.get("Linkedid", "")
            duid, dlink = ev.get("DestUniqueid", ""), ev.get("DestLinkedid", "")
            self._remember(uid, link)
            self._remember(duid, dlink)
            self._find(uid, link) or self._find(duid, dlink)
            return
        if name == "dialend":
            uid, link = ev.get("Uniqueid", ""), ev.get("Linkedid", "")
            duid, dlink = ev.get("DestUniqueid", ""), ev.get("DestLinkedid", "")
            t = self._find(uid, link) or self._find(duid, dlink)
            if t is not None:
                status = str(ev.get("DialStatus", ""))[:32]
                if status and (t.dial_status != "ANSWER"):
                    t.dial_status = status
                if status == "ANSWER" and t.answered_at is None:
                    t.answered_at = now
            return
        if name in ("newchannel", "newstate", "hangup"):
            uid, link = ev.get("Uniqueid", ""), ev.get("Linkedid", "")
            self._remember(uid, link)
            t = self._find(uid, link)
            if t is None:
                return
            if name == "newstate" and str(ev.get("ChannelState", "")) == "6" and t.answered_at is None and not t.dial_status:
                t.answered_at = now  # answered by the dial plan itself (no Dial), e.g. voicemail
            if name == "hangup" and uid == t.uniqueid and not t.done:
                t.done = True
                self._finish(t, ev, now)
            return
        if name == "cdr":  # needs read class cdr; only an ANSWERED one adds to what Hangup said
            if str(ev.get("Disposition", "")).upper() != "ANSWERED":
                return
            uid = ev.get("UniqueID", "") or ev.get("Uniqueid", "")
            t = self._calls.get(uid) or self._by_link.get(self._links.get(uid, ""))
            if t is not None:
                self.emit(CallOutcome(uniqueid=t.uniqueid, linkedid=t.linkedid, answered=True,
                                      talk_seconds=_float(ev.get("BillableSeconds"))))

    def _finish(self, t: _Tracked, ev: Mapping[str, str], now: float) -> None:
        cause = _int(ev.get("Cause"))
        answered = t.answered_at is not None
        talk = round(now - t.answered_at, 3) if t.answered_at is not None else 0.0
        self.emit(CallOutcome(
            uniqueid=t.uniqueid,
            linkedid=t.linkedid,
            answered=answered,
            talk_seconds=talk,
            hangup_cause=cause,
            hangup_text=_clean(ev.get("Cause-txt", ""))[:64],
            dial_status=t.dial_status,
            ended_at=now,
        ))

    def _outbound(self, ev: Mapping[str, str], now: float) -> None:
        """A DialBegin from an internal phone's context is an outbound call: its Exten is the number."""
        if self.outbound is None:
            return
        ctx = str(ev.get("Context", ""))
        pats = self.outbound_contexts()
        if ctx and pats and any(fnmatch.fnmatchcase(ctx, p) for p in pats):
            exten = str(ev.get("Exten", ""))[:40]
            if exten:
                self.outbound(exten, now)


def _int(v) -> int | None:
    try:
        return int(str(v).strip())
    except (TypeError, ValueError):
        return None


def _float(v) -> float | None:
    try:
        return float(str(v).strip())
    except (TypeError, ValueError):
        return None


def _clean(v) -> str:
    return "".join(ch for ch in str(v) if ch.isprintable())
