"""One call, decided: normalise, look up, evaluate rules, score, within the time budget.

The Screener owns the in-memory list index and the compiled policies. ``decide`` is synchronous
and does no I/O (microseconds), so `edgefilter check`, `replay` and the service all take the same
path; ``screen`` adds the budget and fail-open handling the service needs, and runs any
asynchronous fact providers (reputation lookups) under it. Reloading swaps one reference, so a
call in flight finishes on the config it started with.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from edgefilter.core.config import Settings
from edgefilter.core.model import Action, Call, Hit, Number, NumberKind, Verdict
from edgefilter.core.numbers import normalize
from edgefilter.lists.index import ListIndex
from edgefilter.rules.policy import Effective, PolicyBook
from edgefilter.rules.scoring import decide as score_hits
from edgefilter.rules.signals import evaluate

log = logging.getLogger("edgefilter.screen")


@dataclass(frozen=True)
class Decision:
    """A verdict with the facts it was made from (for logs, the call log and explanations)."""

    call: Call
    number: Number
    verdict: Verdict
    effective: Effective
    when: datetime
    elapsed_ms: float = 0.0


class FactSource(Protocol):
    """Something that adds hits from knowledge beyond the call itself (history, reputation)."""

    def hits(self, call: Call, number: Number, now: float) -> Iterable[Hit]: ...


AsyncFactSource = Callable[[Call, Number, float, Effective], Awaitable[Iterable[Hit]]]


class Screener:
    def __init__(
        self,
        settings: Settings,
        index: ListIndex | None = None,
        *,
        clock: Callable[[], float] = time.time,
        wallclock: Callable[[Settings], datetime] | None = None,
    ) -> None:
        self._state = (settings, PolicyBook(settings))
        self.index = index if index is not None else ListIndex()
        self.clock = clock
        self.wallclock = wallclock or (lambda s: s.now())
        self.sources: list[FactSource] = []
        self.async_sources: list[AsyncFactSource] = []

    @property
    def settings(self) -> Settings:
        return self._state[0]

    def reload(self, settings: Settings) -> None:
        """Swap in a new config (already validated); calls in flight keep the old one."""
        self._state = (settings, PolicyBook(settings))

    def decide(self, call: Call, *, when: datetime | None = None, now: float | None = None, extra: Iterable[Hit] = ()) -> Decision:
        """The verdict for one call, synchronously; raises only on a programming error."""
        settings, book = self._state
        now = self.clock() if now is None else now
        when = when or self.wallclock(settings)
        number = normalize(call.callerid, settings.default_region)
        eff = book.resolve(call, when)
        match = self.index.lookup(number.digits, now) if number.kind is not NumberKind.GARBAGE else None
        extra_hits = list(extra)
        for src in self.sources:
            extra_hits.extend(src.hits(call, number, now))
        hits = evaluate(call, number, match, eff, settings, when, extra_hits)
        verdict = score_hits(hits, eff, settings.groups)
        verdict = self._apply_mode(verdict, call, settings)
        return Decision(call, number, verdict, eff, when)

    @staticmethod
    def _apply_mode(verdict: Verdict, call: Call, settings: Settings) -> Verdict:
        if settings.screen.mode != "log-only" or call.forged:
            return verdict  # a forged env block is never answered allow, even in log-only mode
        return Verdict(Action.ALLOW, verdict.score, verdict.hits, verdict.forced_by, verdict.policy, verdict.action, verdict.capped)

    async def screen(self, call: Call) -> Decision:
        """Decide within ``[screen] budget``; on timeout or error answer ``[screen] on_error``."""
        settings = self.settings
        t0 = time.perf_counter()
        try:
            if self.async_sources:
                decision = await asyncio.wait_for(self._screen_async(call), settings.screen.budget)
            else:
                decision = self.decide(call)
        except TimeoutError:
            decision = self.failed(call, "SCREEN_TIMEOUT", f"no decision within {settings.screen.budget * 1000:g} ms")
        except Exception as exc:
            log.exception("screening failed; answering [screen] on_error")
            decision = self.failed(call, "SCREEN_ERROR", f"{type(exc).__name__}: {exc}"[:200])
        elapsed = (time.perf_counter() - t0) * 1000.0
        return Decision(decision.call, decision.number, decision.verdict, decision.effective, decision.when, elapsed)

    async def _screen_async(self, call: Call) -> Decision:
        settings, book = self._state
        now = self.clock()
        number = normalize(call.callerid, settings.default_region)
        eff = book.resolve(call, self.wallclock(settings))
        extra: list[Hit] = []
        for src in self.async_sources:
            extra.extend(await src(call, number, now, eff))
        return self.decide(call, now=now, extra=extra)

    def failed(self, call: Call, rule: str, detail: str) -> Decision:
        """The fail-open (or configured) answer when a decision could not be made."""
        settings, book = self._state
        number = normalize(call.callerid, settings.default_region)
        when = self.wallclock(settings)
        eff = book.resolve(call, when)
        if call.forged:  # still hostile, whatever failed
            hits = evaluate(call, number, None, eff, settings, when)
            return Decision(call, number, score_hits(hits, eff, settings.groups), eff, when)
        hit = Hit(rule, 0.0, "system", detail, settings.screen.on_error)
        verdict = Verdict(settings.screen.on_error, 0.0, (hit,), rule, eff.label)
        return Decision(call, number, verdict, eff, when)


#: Every variable ``channel_variables`` may set: the dial plan reads exactly these (and the challenge
#: variables from challenge.CHALLENGE_VARIABLES); tests/test_dialplan.py holds the two in step.
SCREEN_VARIABLES = (
    "EDGEFILTER_ACTION",
    "EDGEFILTER_SCORE",
    "EDGEFILTER_RULES",
    "EDGEFILTER_POLICY",
    "EDGEFILTER_CATEGORY",
    "EDGEFILTER_WOULD",
    "EDGEFILTER_TAG",
    "EDGEFILTER_REJECT_CAUSE",
    "EDGEFILTER_REJECT_SIT",
    "EDGEFILTER_VOICEMAIL_BOX",
    "EDGEFILTER_APPEAL_ID",
)


def channel_variables(decision: Decision, settings: Settings) -> dict[str, str]:
    """The EDGEFILTER_* variables the dial plan branches on. Values are ours, never the caller's.

    Besides the verdict, each action gets what the dial plan needs to carry it out, from
    ``[actions]``: the reject cause (and whether to play the special-information tone first),
    the voicemail box, the tag text (with the list category when ``tag_category``).
    """
    v = decision.verdict
    out = {
        "EDGEFILTER_ACTION": v.action.value,
        "EDGEFILTER_SCORE": f"{v.score:g}",
        "EDGEFILTER_RULES": " ".join(v.rules),
        "EDGEFILTER_POLICY": v.policy,
    }
    if v.category:
        out["EDGEFILTER_CATEGORY"] = v.category
    if v.would is not None:
        out["EDGEFILTER_WOULD"] = v.would.value
    acts = settings.actions
    if v.action is Action.TAG or v.would is Action.TAG:
        tag = settings.screen.tag_text
        if acts.tag_category and v.category:
            tag = f"{tag} {v.category}"
        out["EDGEFILTER_TAG"] = tag
    if v.action is Action.REJECT:
        # Both, always: the dial plan branches on them without checking for empty values.
        out["EDGEFILTER_REJECT_CAUSE"] = acts.reject_cause
        out["EDGEFILTER_REJECT_SIT"] = "1" if acts.reject_sit else "0"
        # Always, empty unless the screen route offers an appeal (appeals.AppealBook.offer): the
        # dial plan's reject branch tests its length without checking for a stale value.
        out["EDGEFILTER_APPEAL_ID"] = ""
    if v.action in (Action.VOICEMAIL, Action.CHALLENGE):  # a challenge without an id falls back to voicemail
        out["EDGEFILTER_VOICEMAIL_BOX"] = voicemail_box(decision.call, acts.voicemail_box)
    return out


#: A mailbox as the dial plan may pass it (vmbox=, exten=): box or box@context.
_BOX = re.compile(r"[0-9A-Za-z_]{1,40}(@[0-9A-Za-z_]{1,40})?\Z")


def voicemail_box(call: Call, configured: str) -> str:
    """The box for the voicemail action: the subroutine's ARG2 (``vmbox=``, per line), else
    ``[actions] voicemail_box``, else the called extension's box in context ``default``."""
    given = call.params.get("vmbox", "")
    if _BOX.match(given):
        return given
    if configured:
        return configured
    exten = call.params.get("exten") or call.extension
    if _BOX.match(exten) and "@" not in exten:
        return f"{exten}@default"
    return ""
