"""FastAGI routes behind the callee's star codes: refuse, block or report the last caller, undo.

A refusal is what courts weigh: the callee said no, and every later call from that number is a
violation. The dial plan runs ``AGI(agi://127.0.0.1:4573/refuse,callee=${CALLERID(num)})`` when
the user dials *60 (or presses the in-call DTMF feature, which also passes the call's uniqueid);
the route finds the last caller to that extension in the in-memory history, writes the ledger
row (and for block/report a list entry, which the running service then picks up through the
change feed like any CLI change) and answers ``EDGEFILTER_RESULT`` for the dial plan to
confirm by voice. These sessions are not on the screening path; store writes are bounded by a
timeout and a failure answers ``error`` rather than pretending.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from edgefilter.asterisk.agi import AgiSession, close_writer, safe_value
from edgefilter.core.config import Settings
from edgefilter.core.model import NumberKind
from edgefilter.core.numbers import normalize
from edgefilter.lists.index import Entry, Pattern
from edgefilter.rules.behaviour import BehaviourRules
from edgefilter.store.sqlite import ContactSeen, Refusal

log = logging.getLogger("edgefilter.starcodes")

_CALLEE = re.compile(r"^[A-Za-z0-9_+*#.-]{1,64}$")
STORE_TIMEOUT = 2.0



class RefusalStore(Protocol):
    """What the star codes write through (SQLite's Store and PostgreSQL's PgStore both)."""

    async def add_refusal(self, r: Refusal, entry: Entry | None = None) -> int: ...

    async def undo_last_refusal(self, callee: str, now: float) -> Refusal | None: ...


class StarCodes:
    """The refusal ledger's FastAGI side; routes are ``refuse``, ``block-last``, ``report-last``,
    ``undo-last`` and ``outbound`` (the dial plan reports a number our user called)."""

    def __init__(
        self,
        store: Callable[[], RefusalStore],
        behaviour: BehaviourRules,
        settings: Callable[[], Settings],
        submit: Callable[[object], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.behaviour = behaviour
        self.settings = settings
        self.submit = submit
        self.clock = clock

    def routes(self) -> dict[str, Callable[[AgiSession], Awaitable[None]]]:
        return {
            "refuse": self._wrap(lambda s, c: self._refuse(s, c, "refuse")),
            "block-last": self._wrap(lambda s, c: self._refuse(s, c, "block")),
            "report-last": self._wrap(lambda s, c: self._refuse(s, c, "report")),
            "undo-last": self._wrap(self._undo),
            "outbound": self._wrap(self._outbound),
        }

    def _wrap(self, job):
        async def handle(session: AgiSession) -> None:
            callee = _param(session, "callee", 0)
            try:
                if not _CALLEE.match(callee):
                    result = {"EDGEFILTER_RESULT": "badcallee"}
                else:
                    result = await job(session, callee)
            except Exception as e:
                log.warning("%s for %s failed: %s", session.call.route, safe_value(callee, 40), e)
                result = {"EDGEFILTER_RESULT": "error"}
            try:
                await session.set_variables(result)
            finally:
                close_writer(session.writer)

        return handle

    async def _refuse(self, session: AgiSession, callee: str, kind: str) -> dict[str, str]:
        h = self.behaviour.history
        uid = session.call.params.get("call", "")[:64]
        target = h.by_uniqueid(uid) if uid else None
        if target is None:
            target = h.last_by_target.get(callee)
        if target is None or not target.caller:
            return {"EDGEFILTER_RESULT": "nocaller"}
        s = self.settings()
        category = ""
        entry = None
        now = self.clock()
        src = f"starcode:{callee}"
        if kind == "report":
            category = safe_value(_param(session, "category", 1).lower(), 40) or "harassment"
            if category not in s.categories:
                return {"EDGEFILTER_RESULT": "badcategory"}
        if kind in ("block", "report"):
            note = f"{kind} by extension {callee} (star code)"
            entry = Entry("block", Pattern.from_text(target.caller), category, note, src, now, None)
        how = "dtmf" if session.call.params.get("source") == "dtmf" else "starcode"
        ref = Refusal(0, target.caller, target.target or callee, now, kind, category, f"{how}:{callee}", target.uniqueid)
        await asyncio.wait_for(self.store().add_refusal(ref, entry), STORE_TIMEOUT)
        h.refuse(target.caller, ref.callee)
        log.info("refusal: %s of %s by %s (call %s)", kind, target.caller, safe_value(callee, 40), safe_value(target.uniqueid, 40))
        return {"EDGEFILTER_RESULT": "ok", "EDGEFILTER_NUMBER": target.caller}

    async def _undo(self, session: AgiSession, callee: str) -> dict[str, str]:
        r = await asyncio.wait_for(self.store().undo_last_refusal(callee, self.clock()), STORE_TIMEOUT)
        if r is None:
            return {"EDGEFILTER_RESULT": "nothing"}
        self.behaviour.history.unrefuse(r.caller_e164, r.callee)
        log.info("refusal undone: %s of %s by %s", r.kind, r.caller_e164, safe_value(callee, 40))
        return {"EDGEFILTER_RESULT": "undone", "EDGEFILTER_NUMBER": r.caller_e164}

    async def _outbound(self, session: AgiSession, callee: str) -> dict[str, str]:
        raw = session.call.params.get("number", "") or (session.call.args[1] if len(session.call.args) > 1 else "")
        n = normalize(raw[:64], self.settings().default_region)
        if n.kind not in (NumberKind.VALID, NumberKind.SHORT) or not n.e164:
            return {"EDGEFILTER_RESULT": "badnumber"}
        now = self.clock()
        self.behaviour.history.add_contact(n.e164, now)
        self.submit(ContactSeen(n.e164, now, "outbound"))
        return {"EDGEFILTER_RESULT": "ok"}


def _param(session: AgiSession, name: str, pos: int) -> str:
    """A ``name=value`` AGI argument, else the positional one (build_call moves args[0] to exten)."""
    call = session.call
    if name in call.params:
        return call.params[name]
    if pos == 0:
        return call.params.get("exten", "")
    return call.args[pos] if len(call.args) > pos else ""
