"""Behaviour rules: what a number's recent calls, the callee's refusals and STIR/SHAKEN say.

Harassers rotate numbers faster than lists are updated; their behaviour gives them away. These
rules read only the in-memory CallHistory (no I/O on the call path) and are plugged into the
Screener as a FactSource. Each rule's window and threshold are in ``[behaviour]``, its weight,
group and force in ``[rules.NAME]`` like every other rule (a policy may re-weight it).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice

from edgefilter.core.config import Settings
from edgefilter.core.model import Call, Hit, Number, NumberKind
from edgefilter.core.numbers import normalize
from edgefilter.rules.history import CallHistory, RecentCall

#: Kinds whose E.164 we key history on (an INVALID number with digits is still one caller).
KEYED_KINDS = frozenset({NumberKind.VALID, NumberKind.SHORT, NumberKind.INVALID})
MAX_TARGETS = 100000
#: Most recent calls of one number (or block) a rule looks at: bounds the work per call.
SCAN_LIMIT = 200
#: Actions that let the call ring (for RATE_SHORT, the only calls whose hang-up tells something).
RANG_ACTIONS = frozenset({"allow", "tag"})


def call_target(call: Call) -> str:
    """The extension (preferred) or DID a call was for: the key of refusals and RATE_SPREAD."""
    return (call.params.get("exten") or call.extension or call.called or "")[:64]


def block_of(number: Number, digits: int) -> str | None:
    """The number block for RANGE_CAMPAIGN: a valid E.164 without its last ``digits`` digits."""
    if number.kind is not NumberKind.VALID or not number.e164 or len(number.e164) <= digits + 4:
        return None
    return number.e164[:-digits]


class BehaviourRules:
    """The FactSource of RATE_*, RANGE_CAMPAIGN, CLI_NEIGHBOUR, KNOWN_CONTACT, STIR_* and
    REFUSED_BEFORE, plus the observer that records every decided call into the history."""

    def __init__(self, settings: Callable[[], Settings], history: CallHistory | None = None) -> None:
        self.settings = settings
        b = settings().behaviour
        self.history = history or CallHistory(b.horizon, b.memory_calls)

    # -- feeding --------------------------------------------------------------------------
    def record(self, call: Call, number: Number, now: float, action: str = "allow") -> RecentCall:
        """Remember one screened call (after its decision, whose action it notes)."""
        b = self.settings().behaviour
        self.history.horizon = b.horizon
        self.history.max_calls = b.memory_calls
        keyed = number.e164 if number.kind in KEYED_KINDS else None
        rc = RecentCall(
            ts=now,
            uniqueid=call.uniqueid[:64],
            caller=keyed,
            target=call_target(call),
            block=block_of(number, b.campaign_block_digits),
            rang=action in RANG_ACTIONS,
        )
        if len(self.history.last_by_target) > MAX_TARGETS:
            self.history.last_by_target.clear()
        self.history.add(rc, now)
        return rc

    # -- rules ----------------------------------------------------------------------------
    def hits(self, call: Call, number: Number, now: float) -> list[Hit]:
        s = self.settings()
        b = s.behaviour
        if not b.enabled or call.forged:
            return []
        out: list[Hit] = []

        def fire(rule: str, detail: str, extra: float = 0.0) -> None:
            r = s.rules.get(rule)
            if r is not None and r.enabled:
                out.append(Hit(rule, round(r.weight + extra, 3), r.group, detail, r.force))

        self._stir(call, b.stir_ok_results, fire)
        caller = number.e164 if number.kind in KEYED_KINDS else None
        target = call_target(call)
        if caller is None:
            return out
        h = self.history

        scope_callee = None if b.refusal_scope == "anyone" else target
        if h.refused(caller, scope_callee):
            who = "anyone here" if scope_callee is None else f"extension {target}"
            fire("REFUSED_BEFORE", f"{caller} was refused by {who}: this call is a violation")

        known = h.known_since(caller)
        if known is not None and known >= now - b.known_contact_ttl:
            fire("KNOWN_CONTACT", f"{caller} is a known contact (called out to or talked with)")

        # A number never seen before (most callers) has empty windows, and with this call alone
        # none of the rate rules can fire (the config requires burst_calls and spread_targets of
        # 2 or more, short_min_calls of 1 or more): skip them.
        if h.has_calls(caller):
            self._rates(caller, target, now, b, fire)

        # RANGE_CAMPAIGN: distinct numbers of this block, this one included.
        block = block_of(number, b.campaign_block_digits)
        if block is not None:
            numbers: set[str | None] = {caller}
            for c in islice(h.from_block(block, now - b.campaign_window) if h.has_block_calls(block) else (), SCAN_LIMIT):
                numbers.add(c.caller)
                if len(numbers) >= b.campaign_numbers:
                    break
            if len(numbers) >= b.campaign_numbers:
                fire("RANGE_CAMPAIGN", f"{len(numbers)} numbers of block {block}{'X' * b.campaign_block_digits} within {_span(b.campaign_window)}")

        # CLI_NEIGHBOUR: caller shares the DID's leading digits but is not the DID.
        if number.kind is NumberKind.VALID and call.dnid and call.dnid != "unknown":
            did = normalize(call.dnid, s.default_region)
            k = b.neighbour_digits
            if (did.kind is NumberKind.VALID and did.digits and number.digits and did.digits != number.digits
                    and len(did.digits) > k and did.digits[:k] == number.digits[:k]):
                fire("CLI_NEIGHBOUR", f"shares the leading {k} digits of the DID called ({did.e164})")
        return out

    def _rates(self, caller: str, target: str, now: float, b, fire) -> None:
        """RATE_BURST, RATE_SPREAD and RATE_SHORT of a number with calls in memory."""
        from_caller = self.history.from_caller

        # RATE_BURST: calls in the window, this one included (counted up to SCAN_LIMIT: a flooding
        # number must not make every one of its calls slower).
        n = 1 + sum(1 for _ in islice(from_caller(caller, now - b.burst_window), SCAN_LIMIT))
        if n >= b.burst_calls:
            fire("RATE_BURST", f"{n} calls within {_span(b.burst_window)} (threshold {b.burst_calls})",
                 b.burst_step * (n - b.burst_calls))

        # RATE_SPREAD: distinct targets in the window, this one included.
        targets = {target} if target else set()
        for c in islice(from_caller(caller, now - b.spread_window), SCAN_LIMIT):
            if c.target:
                targets.add(c.target)
                if len(targets) >= b.spread_targets:
                    break
        if len(targets) >= b.spread_targets:
            fire("RATE_SPREAD", f"reached {len(targets)} extensions/DIDs within {_span(b.spread_window)}")

        # RATE_SHORT: among calls we let ring whose outcome is known (a call we rejected or sent to
        # voicemail being "unanswered" would otherwise feed on itself).
        known_outcomes = [c for c in islice(from_caller(caller, now - b.short_window), SCAN_LIMIT)
                          if c.answered is not None and c.rang]
        if len(known_outcomes) >= b.short_min_calls:
            short = sum(1 for c in known_outcomes if not c.answered or (c.talk_seconds or 0.0) < b.short_seconds)
            share = short / len(known_outcomes)
            if share >= b.short_share:
                fire("RATE_SHORT", f"{short} of {len(known_outcomes)} recent calls unanswered or under {_span(b.short_seconds)}")

    @staticmethod
    def _stir(call: Call, ok_results: tuple[str, ...], fire) -> None:
        attest = call.params.get("stir", "").strip().upper()[:8]
        verify = call.params.get("stir_verify", "").strip()[:80]
        v = verify.lower()
        if v and v not in ("not present", "verification not present", "none") and v not in {o.lower() for o in ok_results}:
            fire("STIR_FAILED", "STIR/SHAKEN verification did not pass")
            return
        if attest in ("A", "B", "C"):
            fire(f"STIR_{attest}", f"STIR/SHAKEN attestation {attest}")


def _span(seconds: float) -> str:
    from edgefilter.core.durations import format_duration

    return format_duration(seconds)
