"""The Screener's reputation hook: cached answers at once, fresh ones only within the deadline.

``Screener.screen`` runs async fact sources under ``asyncio.wait_for(budget)``; past the budget
the whole decision becomes SCREEN_TIMEOUT. This hook keeps its own, shorter deadline (the budget
minus ``[reputation] margin``) so that a slow source only costs its own rule: the call is decided
without it, with a zero-weight REPUTATION_PENDING saying so, and the fetch goes on detached to
fill the cache for the next call.

Privacy: only valid public numbers are ever sent. Numbers on the allowlist (exact or prefix, even
when a block entry wins), in any policy's never_block set, short numbers, extensions, invalid,
garbage or withheld caller IDs (presentation restricted included) never leave the box.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from edgefilter.core.config import ReputationSource, Settings
from edgefilter.core.errors import PatternError
from edgefilter.core.model import Call, Hit, Number, NumberKind
from edgefilter.lists.index import Entry, ListIndex, parse_pattern
from edgefilter.reputation.answers import LISTED, UNAVAILABLE, Answer, weight_of
from edgefilter.reputation.client import ReputationClient, answer_from_row
from edgefilter.rules.policy import Effective
from edgefilter.rules.signals import PRES_MASK

log = logging.getLogger("edgefilter.reputation")


def never_block_index(settings: Settings) -> ListIndex:
    """Every policy's never_block numbers, whichever line is called: none of them is ever sent."""
    never = ListIndex()
    for p in settings.policies:
        for text in p.never_block:
            try:
                never.put(Entry("allow", parse_pattern(text, settings.default_region), source=f"policy:{p.name}"))
            except PatternError:
                pass  # PolicyBook already refused such a config
    return never


def private_reason(call: Call, number: Number, now: float, index: ListIndex, never_block: ListIndex) -> str | None:
    """Why this number must not be sent anywhere, or None when it may be looked up."""
    if number.kind is not NumberKind.VALID or not number.e164:
        return number.kind.value  # short numbers, extensions, invalid, withheld, garbage
    if call.callingpres & PRES_MASK:
        return "presentation restricted"
    digits = number.digits
    match = index.lookup(digits, now)
    if match is not None and (match.entry.list == "allow" or (match.shadowed is not None and match.shadowed.list == "allow")):
        return "allowlist"
    if never_block.lookup(digits, now) is not None:
        return "never_block"
    return None


class ReputationLookup:
    """``async (call, number, now, effective) -> list[Hit]``, for ``Screener.async_sources``."""

    def __init__(self, client: ReputationClient, settings: Settings, index: Callable[[], ListIndex]) -> None:
        self.client = client
        self.index = index
        self.reload(settings)
        self.skipped: dict[str, int] = {}  # why numbers were not looked up (privacy), for tests and stats

    def reload(self, settings: Settings) -> None:
        self.settings = settings
        self.never_block = never_block_index(settings)

    def deadline(self) -> float:
        """Seconds a call may wait for sources: the budget minus the margin kept for deciding."""
        s = self.settings
        return max(0.0, s.screen.budget - s.reputation.margin)

    def private(self, call: Call, number: Number, now: float) -> str | None:
        return private_reason(call, number, now, self.index(), self.never_block)

    async def __call__(self, call: Call, number: Number, now: float, eff: Effective) -> list[Hit]:
        try:
            return await self._lookup(call, number, now, eff)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must cost the reputation rules only, never the decision
            log.exception("reputation lookup failed; deciding without it")
            return [h for h in [self._hit(eff, "REPUTATION_ERROR", 0.0, "internal error; see the log")] if h]

    async def _lookup(self, call: Call, number: Number, now: float, eff: Effective) -> list[Hit]:
        sources = self.client.sources
        if not sources:
            return []
        why = self.private(call, number, now)
        if why is not None:
            self.skipped[why] = self.skipped.get(why, 0) + 1
            return []
        e164 = number.e164
        assert e164, "private_reason lets only numbers with an E.164 form through"
        hits: list[Hit | None] = []
        waiting: dict[str, tuple[ReputationSource, asyncio.Task[Answer]]] = {}
        for src in sources:
            row = self.client.cached(src.name, e164, now)
            if row is not None:
                hits.append(self._answer_hit(eff, src, answer_from_row(row), now))
                continue
            got = self.client.fetch(src, e164)
            if isinstance(got, str):
                hits.append(self._hit(eff, "REPUTATION_UNAVAILABLE", 0.0, f"{src.name}: {got}"))
            else:
                waiting[src.name] = (src, got)
        if waiting:
            wait = self.deadline()
            t0 = time.perf_counter()
            await asyncio.wait([t for _, t in waiting.values()], timeout=wait)
            for src, task in waiting.values():
                if not task.done():
                    hits.append(self._hit(eff, "REPUTATION_PENDING", 0.0,
                                          f"{src.name}: no answer within {wait * 1000:.0f} ms; it will be cached for the next call"))
                elif task.cancelled() or task.exception() is not None:
                    hits.append(self._hit(eff, "REPUTATION_ERROR", 0.0, f"{src.name}: lookup failed"))
                else:
                    answer = task.result()
                    if not answer.cached:
                        answer = _with_elapsed(answer, (time.perf_counter() - t0) * 1000.0)
                    hits.append(self._answer_hit(eff, src, answer, now))
        return [h for h in hits if h is not None]

    def _answer_hit(self, eff: Effective, src: ReputationSource, answer: Answer, now: float) -> Hit | None:
        return answer_hit(self.settings, eff, src, answer, now)

    def _hit(self, eff: Effective, rule: str, add: float, detail: str) -> Hit | None:
        return rule_hit(self.settings, eff, rule, add, detail)


def answer_hit(settings: Settings, eff: Effective, src: ReputationSource, answer: Answer, now: float) -> Hit | None:
    """The hit one source's answer makes (None for an answer that weighs nothing)."""
    if answer.status == LISTED:
        weight, why = weight_of(src, answer)
        if weight == 0:
            return None
        origin = _age(answer, now) if answer.cached else f"asked, {answer.elapsed_ms:.0f} ms"
        return rule_hit(settings, eff, "REPUTATION_LISTED", weight, f"{src.name}: {why} -> {weight:+g} ({origin})")
    if answer.ok:  # not listed: nothing to say
        return None
    rule = "REPUTATION_UNAVAILABLE" if answer.status == UNAVAILABLE else "REPUTATION_ERROR"
    return rule_hit(settings, eff, rule, 0.0, f"{src.name}: {answer.reason}")


def rule_hit(settings: Settings, eff: Effective, rule: str, add: float, detail: str) -> Hit | None:
    """A REPUTATION_* hit: the rule's (policy-adjusted) weight plus the source's, if enabled."""
    r = settings.rules.get(rule)
    if r is None or not r.enabled:
        return None
    return Hit(rule, round(eff.weight(rule, r.weight) + add, 3), r.group, detail[:200], r.force)


def _age(answer: Answer, now: float) -> str:
    if answer.fetched_at is None:
        return "cached"
    age = max(0.0, now - answer.fetched_at)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if age >= size:
            return f"cached {int(age // size)}{unit} ago"
    return f"cached {age:.0f}s ago"


def _with_elapsed(answer: Answer, waited_ms: float) -> Answer:
    from dataclasses import replace

    return replace(answer, elapsed_ms=answer.elapsed_ms or round(waited_ms, 1))
