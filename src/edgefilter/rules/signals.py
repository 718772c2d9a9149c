"""Rules that look at one call and the facts gathered for it, and say what fired.

Pure: no I/O, no clock. ``evaluate`` turns a Call, its normalised Number, the list match and the
policy in force into Hits carrying the weights the policy assigns, so that scoring only adds up.
Rules from other sources (behaviour history, reputation) arrive as ready-made ``extra`` hits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime

from edgefilter.core.config import Settings
from edgefilter.core.model import Action, Call, Hit, Number, NumberKind
from edgefilter.lists.index import Match
from edgefilter.rules.policy import Effective

#: Bits of Asterisk's callingpres: 0x20 = presentation prohibited, 0x40 = unavailable.
PRES_MASK = 0x60
NAME_LIMIT = 256
#: Only numbers that could really exist may be allowed by a list or a never-block set.
ALLOWABLE_KINDS = frozenset({NumberKind.VALID, NumberKind.SHORT})  # longest caller name handed to name patterns (Asterisk cuts at 79 bytes anyway)


def evaluate(
    call: Call,
    number: Number,
    match: Match | None,
    eff: Effective,
    settings: Settings,
    when: datetime,
    extra: Iterable[Hit] = (),
) -> list[Hit]:
    hits: list[Hit] = []

    def fire(rule: str, detail: str = "", *, add: float = 0.0, force: Action | None = None, category: str = "") -> None:
        r = settings.rules.get(rule)
        if r is None or not r.enabled:
            return
        hits.append(Hit(rule, round(eff.weight(rule, r.weight) + add, 3), r.group, detail, force or r.force, category))

    if call.forged:
        fire("CLI_FORGED", call.forged)
    if call.params.get("cidfiltered", "").lower() in ("1", "yes", "true"):
        fire("CLI_FILTERED", "dial plan removed characters from the caller ID")

    if number.kind is NumberKind.WITHHELD:
        fire("CLI_WITHHELD", number.reason)
    elif call.callingpres & PRES_MASK:
        fire("CLI_WITHHELD", f"presentation restricted (callingpres {call.callingpres})")
    if number.kind is NumberKind.INVALID:
        fire("CLI_INVALID", number.reason)
    elif number.kind is NumberKind.GARBAGE:
        fire("CLI_GARBAGE", number.reason)
    elif number.kind is NumberKind.SHORT:
        fire("CLI_SHORT", number.reason)

    allowed = False
    # Only numbers that could really exist may be allowed, and never from a forged env block or
    # caller ID (the number in front of a planted line feed may be a friend's).
    trusted = number.kind in ALLOWABLE_KINDS and not call.forged
    if match is not None and match.entry.list == "allow" and not trusted:
        # An invalid caller ID never buys an allow (a prefix like +86138* must not admit "138").
        match = Match(match.shadowed) if match.shadowed is not None and match.shadowed.list == "block" else None
    if match is not None:
        e = match.entry
        shadow = f"; beats {match.shadowed.list} {match.shadowed.pattern.text}" if match.shadowed else ""
        if e.list == "allow":
            allowed = True
            fire("LIST_ALLOWED", f"{e.pattern.text} ({e.source}){shadow}")
        else:
            cat = settings.categories.get(e.category) if e.category else None
            if cat is None:
                fire("LIST_BLOCKED", f"{e.pattern.text} ({e.source}){shadow}")
            else:
                active = cat.schedule is None or settings.schedules[cat.schedule].active(when)
                weight = cat.weight if active else 0.0
                note = "" if active else f", outside schedule {cat.schedule}"
                fire("LIST_CATEGORY", f"{e.pattern.text} category={cat.name}{note} ({e.source}){shadow}",
                     add=weight, force=cat.force if active else None, category=cat.name)

    if eff.never_block is not None and number.digits and trusted:
        nb = eff.never_block.lookup(number.digits)
        if nb is not None:
            allowed = True
            fire("POLICY_NEVER_BLOCK", f"{nb.entry.pattern.text} ({nb.entry.source})")
    if eff.allowlist_only and not allowed:
        fire("POLICY_ALLOWLIST_ONLY", f"policy {eff.label} accepts allowlisted callers only",
             force=settings.screen.allowlist_only_action)

    name = call.calleridname
    if name and name != "unknown":
        name = name[:NAME_LIMIT]
        for rule in settings.rules.values():
            if rule.name_pattern is not None and rule.enabled and rule.name_pattern.search(name):
                fire(rule.name, f"caller name matches {rule.name_pattern.pattern!r}")

    for h in extra:
        # Sources (behaviour, reputation) weigh with the rule's base weight; a policy that
        # re-weights the rule for this line scales the hit accordingly (0 silences it).
        base = settings.rules.get(h.rule)
        if base is not None and base.weight and eff.weights.get(h.rule, base.weight) != base.weight:
            h = replace(h, weight=round(h.weight * eff.weights[h.rule] / base.weight, 3))
        hits.append(h)
    return hits
