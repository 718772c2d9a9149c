"""Verdicts from rule hits, in rspamd's manner: weights, group caps, forced actions, thresholds.

Pure functions: the same hits and effective settings always give the same verdict, which is what
makes `edgefilter check`, `replay` and the golden call cases trustworthy.
"""

from __future__ import annotations

from edgefilter.core.model import THRESHOLD_ACTIONS, Action, Hit, Verdict
from edgefilter.rules.policy import Effective

#: Groups whose forced actions win over every other force (a forged env block is never allowed).
OVERRIDING_GROUPS = frozenset({"system"})


def decide(hits: list[Hit], eff: Effective, groups: dict[str, float | None]) -> Verdict:
    """Combine hits into one Verdict.

    Order of precedence: a force from the ``system`` group (CLI_FORGED), then a forced allow
    (allowlist, never-block), then the harshest other forced action, then the thresholds.
    Policy action remaps (``actions = { tag = "voicemail" }``) apply to threshold outcomes only.
    """
    totals: dict[str, float] = {}
    for h in hits:
        totals[h.group] = totals.get(h.group, 0.0) + h.weight
    score = 0.0
    capped: list[tuple[str, float, float]] = []
    for group, total in totals.items():
        cap = groups.get(group)
        if cap is not None and total > cap:
            capped.append((group, total, cap))
            total = cap
        score += total
    score = round(score, 3)

    forced = _forced(hits)
    if forced is not None:
        action, rule = forced
        return Verdict(action=action, score=score, hits=tuple(hits), forced_by=rule, policy=eff.label, capped=tuple(capped))

    action = Action.ALLOW
    for act in THRESHOLD_ACTIONS:
        if score >= eff.thresholds[act]:
            action = act
    action = eff.actions.get(action, action)
    return Verdict(action=action, score=score, hits=tuple(hits), policy=eff.label, capped=tuple(capped))


def _forced(hits: list[Hit]) -> tuple[Action, str] | None:
    system = [(h.force, h.rule) for h in hits if h.force is not None and h.group in OVERRIDING_GROUPS]
    if system:
        return max(system, key=lambda fr: fr[0].severity)  # the first of the most severe, as before
    allows = [h for h in hits if h.force is Action.ALLOW]
    if allows:
        return Action.ALLOW, allows[0].rule
    others = [(h.force, h.rule) for h in hits if h.force is not None]
    if others:
        return max(others, key=lambda fr: fr[0].severity)
    return None


def explain(verdict: Verdict, eff: Effective) -> list[str]:
    """Human lines for `edgefilter check`: policy, every hit with weight and group, caps, thresholds."""
    lines = [f"policy: {verdict.policy}"]
    if verdict.hits:
        lines.append("rules:")
        for h in verdict.hits:
            force = f"  forces {h.force.value}" if h.force else ""
            lines.append(f"  {h.rule:<22} {h.weight:+7.2f}  group={h.group or '-':<8}{force}  {h.detail}")
    else:
        lines.append("rules: none fired")
    for group, raw, cap in verdict.capped:
        lines.append(f"cap: group {group} total {raw:+.2f} capped at {cap:+.2f}")
    marks = []
    for act in THRESHOLD_ACTIONS:
        t = eff.thresholds[act]
        marks.append(f"{act.value} {t:g} {'reached' if verdict.score >= t else 'not reached'}")
    lines.append(f"score: {verdict.score:g}  ({'; '.join(marks)})")
    if eff.actions:
        lines.append("remaps: " + ", ".join(f"{a.value} -> {b.value}" for a, b in eff.actions.items()))
    if verdict.forced_by:
        lines.append(f"forced by: {verdict.forced_by}")
    if verdict.would is not None:
        lines.append(f"log-only mode: would {verdict.would.value}, answers allow")
    lines.append(f"action: {verdict.action.value}")
    return lines
