"""What happened over a period, computed from call-log rows: pure, no I/O.

`edgefilter stats` and the HTML report both read a ``Stats``. The rows come from the ``calls``
table (``Store.recent_calls``); anything with the same attributes works, so tests feed a known
call log straight in.

Definitions (also in docs/observability.md):
- *blocked* = the call did not ring through to the callee directly: the action answered was
  ``challenge``, ``voicemail`` or ``reject``. ``tag`` still rings (with a label), so it is not
  blocked. In log-only mode every call is answered ``allow``; the action it *would* have had is
  counted separately (``would_by_action``, ``would_blocked``).
- latency = ``elapsed_ms``, the time the service took to decide (not the FastAGI round trip);
  percentiles by the nearest-rank method.
- calls per hour by action, in the configured time zone; periods longer than 72 h are shown
  per day instead so that a chart stays readable.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from typing import Protocol

ACTIONS = ("allow", "tag", "challenge", "voicemail", "reject")
BLOCKED = ("challenge", "voicemail", "reject")
HOURLY_UP_TO = 72 * 3600.0
PERCENTILES = (50, 90, 99)


class CallRow(Protocol):
    """The call-log columns stats reads (``records.CallRecord`` has them)."""

    # read-only properties: frozen dataclasses (records.CallRecord) have them
    @property
    def ts(self) -> float: ...

    @property
    def caller(self) -> str: ...

    @property
    def caller_e164(self) -> str | None: ...

    @property
    def called(self) -> str: ...

    @property
    def action(self) -> str: ...

    @property
    def would(self) -> str | None: ...

    @property
    def score(self) -> float: ...

    @property
    def rules(self) -> str: ...

    @property
    def policy(self) -> str: ...

    @property
    def elapsed_ms(self) -> float: ...


@dataclass(frozen=True)
class Bucket:
    start: datetime  # local (configured zone) start of the hour or day
    counts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class BlockedCaller:
    caller: str  # E.164 when known, else the raw caller ID (caller-controlled: escape on output)
    calls: int
    last_ts: float
    last_action: str


@dataclass(frozen=True)
class Stats:
    since: float
    until: float
    total: int
    by_action: dict[str, int]
    would_by_action: dict[str, int]
    blocked: int
    would_blocked: int
    top_blocked_callers: list[BlockedCaller]
    top_rules: list[tuple[str, int]]
    latency_ms: dict[str, float]  # p50, p90, p99, max (empty when there were no calls)
    bucket_seconds: int  # 3600 or 86400
    buckets: list[Bucket] = field(default_factory=list)
    refused_rules: dict[str, int] = field(default_factory=dict)  # rule -> rejected calls it fired on
    appeals: AppealStats | None = None  # appeal_precision(), when the store has appeals

    @property
    def blocked_share(self) -> float:
        return self.blocked / self.total if self.total else 0.0

    @property
    def log_only(self) -> int:
        return sum(self.would_by_action.values())

    def share(self, n: int) -> float:
        return n / self.total if self.total else 0.0

    def as_dict(self) -> dict:
        """Plain values for ``--json``."""
        return {
            "since": self.since,
            "until": self.until,
            "total": self.total,
            "by_action": self.by_action,
            "blocked": self.blocked,
            "blocked_share": round(self.blocked_share, 4),
            "would_by_action": self.would_by_action,
            "would_blocked": self.would_blocked,
            "top_blocked_callers": [
                {"caller": c.caller, "calls": c.calls, "last_ts": c.last_ts, "last_action": c.last_action}
                for c in self.top_blocked_callers
            ],
            "top_rules": [{"rule": r, "calls": n} for r, n in self.top_rules],
            "latency_ms": self.latency_ms,
            "bucket_seconds": self.bucket_seconds,
            "buckets": [{"start": b.start.isoformat(), **b.counts} for b in self.buckets],
            **({"appeals": self.appeals.as_dict()} if self.appeals is not None else {}),
        }


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list (the smallest value with >= p% at or below)."""
    if not sorted_values:
        raise ValueError("no values")
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100.0 * len(sorted_values)) - 1))
    return sorted_values[k]


WITHHELD = "(withheld)"


def caller_key(row: CallRow) -> str:
    """Who called: the E.164 number when it normalised; all withheld callers (anonymous,
    Restricted, empty...) as one "(withheld)"; else the raw caller ID as sent."""
    if row.caller_e164:
        return row.caller_e164
    if getattr(row, "caller_kind", "") == "withheld" or not row.caller:
        return WITHHELD
    return row.caller


def bucket_starts(since: float, until: float, tz: tzinfo | None, seconds: int) -> list[datetime]:
    """Local hour (or day) starts covering [since, until), aligned to the clock of ``tz``."""
    cur = datetime.fromtimestamp(since, tz).replace(minute=0, second=0, microsecond=0)
    if seconds >= 86400:
        cur = cur.replace(hour=0)
    out: list[datetime] = []
    while cur.timestamp() < until:
        out.append(cur)
        if seconds >= 86400:
            cur = (cur + timedelta(days=1)).replace(hour=0)  # wall-clock day, DST-safe
        else:
            cur = datetime.fromtimestamp(cur.timestamp() + 3600, tz).replace(minute=0, second=0, microsecond=0)
        if len(out) > 100000:  # absurd periods: stop rather than eat memory
            break
    return out


class StatsBuilder:
    """Accumulates call-log rows one at a time (the CLI streams them from the database), so
    memory grows with distinct blocked callers and one float per call, not with whole rows."""

    def __init__(self, *, since: float, until: float, tz: tzinfo | None = None, top: int = 10) -> None:
        self.since, self.until, self.tz, self.top = since, until, tz, top
        self.by_action: Counter[str] = Counter({a: 0 for a in ACTIONS})
        self.would: Counter[str] = Counter()
        self.rules: Counter[str] = Counter()
        self.refused_rules: Counter[str] = Counter()
        self.blocked_callers: dict[str, list] = {}
        self.latencies: list[float] = []
        self.seconds = 3600 if until - since <= HOURLY_UP_TO else 86400
        self.starts = bucket_starts(since, until, tz, self.seconds)
        self.edges = [b.timestamp() for b in self.starts]
        self.bucket_counts: list[Counter[str]] = [Counter() for _ in self.starts]
        self.total = 0

    def add(self, r: CallRow) -> None:
        if not (self.since <= r.ts < self.until):
            return
        self.total += 1
        self.by_action[r.action] += 1
        if r.would:
            self.would[r.would] += 1
        if r.rules:
            self.rules.update(set(r.rules.split()))
            if r.action == "reject":
                self.refused_rules.update(set(r.rules.split()))
        self.latencies.append(float(r.elapsed_ms))
        if r.action in BLOCKED:
            entry = self.blocked_callers.setdefault(caller_key(r), [0, 0.0, ""])
            entry[0] += 1
            if r.ts >= entry[1]:
                entry[1], entry[2] = r.ts, r.action
        i = bisect_right(self.edges, r.ts) - 1
        if 0 <= i < len(self.bucket_counts):
            self.bucket_counts[i][r.action] += 1

    def result(self) -> Stats:
        lat = sorted(self.latencies)
        latency: dict[str, float] = {}
        if lat:
            latency = {f"p{p}": percentile(lat, p) for p in PERCENTILES}
            latency["max"] = lat[-1]
        ranked = sorted(self.blocked_callers.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))[: self.top]
        order = list(ACTIONS) + sorted(set(self.by_action) - set(ACTIONS))  # unknown words from a foreign log
        return Stats(
            since=self.since,
            until=self.until,
            total=self.total,
            by_action={a: self.by_action[a] for a in order},
            would_by_action={a: self.would[a] for a in order if self.would[a]},
            blocked=sum(self.by_action[a] for a in BLOCKED),
            would_blocked=sum(self.would[a] for a in BLOCKED),
            top_blocked_callers=[BlockedCaller(k, v[0], v[1], v[2]) for k, v in ranked],
            top_rules=sorted(self.rules.items(), key=lambda kv: (-kv[1], kv[0]))[: self.top],
            latency_ms=latency,
            bucket_seconds=self.seconds,
            buckets=[Bucket(b, {a: c[a] for a in order}) for b, c in zip(self.starts, self.bucket_counts, strict=True)],
            refused_rules=dict(self.refused_rules),
        )


def compute(
    rows: Iterable[CallRow],
    *,
    since: float,
    until: float,
    tz: tzinfo | None = None,
    top: int = 10,
) -> Stats:
    """Everything the `stats` command and the report show, for rows with since <= ts < until."""
    builder = StatsBuilder(since=since, until=until, tz=tz, top=top)
    for r in rows:
        builder.add(r)
    return builder.result()


# ------------------------------------------------------------------------------ appeals
class AppealRow(Protocol):
    """The appeal columns precision reads (``store.Appeal`` has them)."""

    # read-only properties: frozen dataclasses (store.Appeal) have them
    @property
    def ts(self) -> float: ...

    @property
    def rules(self) -> str: ...  # "RULE(+weight) ..."

    @property
    def entry_source(self) -> str: ...

    @property
    def status(self) -> str: ...  # pending | granted | denied


@dataclass(frozen=True)
class Precision:
    """How one rule (or list source) fared with the people it refused.

    ``refused`` is the rejected calls the rule fired on in the period (the call log does not
    name list sources: None for them). Granted appeals are refusals an admin found wrong, so
    ``granted / refused`` is a lower bound of the rule's false-positive rate (not every wronged
    caller appeals), and ``granted / decided`` says how often an appeal against it was right.
    """

    key: str
    refused: int | None
    appealed: int
    granted: int
    denied: int

    @property
    def pending(self) -> int:
        return self.appealed - self.granted - self.denied

    @property
    def decided_share(self) -> float | None:
        decided = self.granted + self.denied
        return self.granted / decided if decided else None

    @property
    def false_positive(self) -> float | None:
        return self.granted / self.refused if self.refused else None

    def as_dict(self) -> dict:
        return {"key": self.key, "refused": self.refused, "appealed": self.appealed, "granted": self.granted,
                "denied": self.denied, "pending": self.pending, "granted_of_decided": self.decided_share,
                "false_positive_at_least": self.false_positive}


@dataclass(frozen=True)
class AppealStats:
    appealed: int
    granted: int
    denied: int
    rules: list[Precision]
    sources: list[Precision]
    suggestions: list[str]

    def as_dict(self) -> dict:
        return {"appealed": self.appealed, "granted": self.granted, "denied": self.denied,
                "rules": [p.as_dict() for p in self.rules], "sources": [p.as_dict() for p in self.sources],
                "suggestions": self.suggestions}


def _span(seconds: float) -> str:
    days = seconds / 86400
    return f"{days:.0f} days" if days >= 2 else f"{seconds / 3600:.0f} hours"


def appeal_precision(appeals: Iterable[AppealRow], refused_rules: dict[str, int], *, since: float, until: float) -> AppealStats:
    """Appeals that came in during [since, until), per rule and per list source, with suggestions
    for every rule or source that produced granted appeals."""
    rules: dict[str, list[int]] = {}
    sources: dict[str, list[int]] = {}
    total = [0, 0, 0]
    for a in appeals:
        if not since <= a.ts < until:
            continue
        col = {"granted": 1, "denied": 2}.get(a.status)
        keys = [(rules, r.split("(", 1)[0]) for r in dict.fromkeys(a.rules.split())]
        if a.entry_source:
            keys.append((sources, a.entry_source))
        for table, key in [*keys, (None, "")]:
            row = total if table is None else table.setdefault(key, [0, 0, 0])
            row[0] += 1
            if col:
                row[col] += 1
    rule_rows = [Precision(k, refused_rules.get(k, 0), *v) for k, v in rules.items()]
    source_rows = [Precision(k, None, *v) for k, v in sources.items()]
    order = lambda p: (-p.granted, -p.appealed, p.key)  # noqa: E731
    rule_rows.sort(key=order)
    source_rows.sort(key=order)
    span = _span(until - since)
    tips = [f"source `{p.key}`: {p.granted} of {p.appealed} appeals granted in {span}: check the feed "
            f"(edgefilter export --source {p.key}; remove-source or a fresher file)" for p in source_rows if p.granted]
    tips += [f"rule {p.key}: {p.granted} of {p.appealed} appeals granted in {span} ({p.granted} of {p.refused} refused calls"
             f"{', ' + format(p.false_positive, '.1%') if p.false_positive is not None else ''} at least wrongly refused): "
             "lower its weight or narrow it" for p in rule_rows if p.granted and p.key not in ("LIST_BLOCKED", "LIST_CATEGORY")]
    return AppealStats(total[0], total[1], total[2], rule_rows, source_rows, tips)
