"""Per-line policies: which overrides apply to a call, by called number, extension, context and time.

Policies layer like CSS: every policy whose matchers and schedule fit the call applies, from the
least specific (no matcher) through context and extension to DID, later declarations winning
ties; the result is one Effective view of thresholds, weights, action remaps, allowlist-only and
never-block patterns. Pure: time comes in as an argument so tests can pin it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from datetime import datetime

from edgefilter.core.config import Policy, Settings
from edgefilter.core.errors import ConfigError, PatternError
from edgefilter.core.model import THRESHOLD_ACTIONS, Action, Call
from edgefilter.core.numbers import normalize
from edgefilter.lists.index import Entry, ListIndex, parse_pattern


@dataclass(frozen=True)
class Effective:
    """The settings in force for one call once matching policies are applied."""

    names: tuple[str, ...]
    thresholds: dict[Action, float]
    weights: dict[str, float]
    actions: dict[Action, Action]
    allowlist_only: bool
    never_block: ListIndex | None = None
    schedule_notes: tuple[str, ...] = field(default=())

    @property
    def label(self) -> str:
        return "+".join(self.names) if self.names else "default"

    def weight(self, rule: str, default: float) -> float:
        return self.weights.get(rule, default)


class PolicyBook:
    """Settings' policies compiled once per config load (patterns parsed, never-block indexed)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.base_weights = {name: r.weight for name, r in settings.rules.items()}
        self._policies = sorted(settings.policies, key=lambda p: (p.specificity, p.order))
        self._never: dict[str, ListIndex] = {}
        self._dids: dict[str, tuple[str, ...]] = {}
        for p in self._policies:
            if p.never_block:
                idx = ListIndex()
                for text in p.never_block:
                    try:
                        idx.put(Entry("allow", parse_pattern(text, settings.default_region), source=f"policy:{p.name}"))
                    except PatternError as e:
                        raise ConfigError(f"[policies.{p.name}] never_block: {e}") from None
                self._never[p.name] = idx
            self._dids[p.name] = tuple(self._did_key(d, p.name) for d in p.match_did)
        # When no policy has a schedule or a matcher, every call gets the same Effective (an
        # immutable value nobody writes to): build it once instead of copying the weights of
        # every rule per call.
        self._static: Effective | None = None
        if not any(p.schedule or p.match_did or p.match_extension or p.match_context for p in self._policies):
            self._static = self._resolve(None, None)

    def _did_key(self, text: str, name: str) -> str:
        """DIDs are matched on E.164 digits, with '*' allowed as a trailing wildcard."""
        star = text.endswith("*")
        body = text[:-1] if star else text
        try:
            pat = parse_pattern(body + ("*" if star else ""), self.settings.default_region)
        except PatternError as e:
            raise ConfigError(f"[policies.{name}] match_did: {e}") from None
        return pat.key + ("*" if star else "")

    def _matches(self, p: Policy, call: Call, when: datetime | None) -> bool:
        if p.schedule:
            assert when is not None, "a scheduled policy is matched at the time of a call"
            negate = p.schedule.startswith("!")
            active = self.settings.schedules[p.schedule.lstrip("!")].active(when)
            if active == negate:
                return False
        if p.match_did:
            called = normalize(call.called, self.settings.default_region)
            digits = called.digits or ""
            if not any(digits.startswith(k[:-1]) if k.endswith("*") else digits == k for k in self._dids[p.name]):
                return False
        exten = call.params.get("exten") or call.extension
        if p.match_extension and not any(fnmatch.fnmatchcase(exten, pat) for pat in p.match_extension):
            return False
        if p.match_context and not any(fnmatch.fnmatchcase(call.context, pat) for pat in p.match_context):
            return False
        return True

    def resolve(self, call: Call, when: datetime) -> Effective:
        if self._static is not None:
            return self._static
        return self._resolve(call, when)

    def _resolve(self, call: Call | None, when: datetime | None) -> Effective:
        s = self.settings
        names: list[str] = []
        thresholds = dict(s.thresholds)
        weights = dict(self.base_weights)
        actions: dict[Action, Action] = {}
        allowlist_only = False
        never: ListIndex | None = None
        for p in self._policies:
            if call is not None and not self._matches(p, call, when):
                continue
            names.append(p.name)
            thresholds.update(p.thresholds)
            weights.update(p.weights)
            actions.update(p.actions)
            if p.allowlist_only is not None:
                allowlist_only = p.allowlist_only
            if p.name in self._never:
                if never is None:
                    never = ListIndex()
                never.extend(self._never[p.name])
        return Effective(
            names=tuple(names),
            thresholds={a: thresholds[a] for a in THRESHOLD_ACTIONS},
            weights=weights,
            actions=actions,
            allowlist_only=allowlist_only,
            never_block=never,
        )
