"""`edgefilter replay`: what a new config would have done to the calls already received.

Every recorded call (store ``calls``) is decided again by Screener.decide under the new config,
with the lists as they are now, at the time of day it arrived (schedules and time-bound
policies apply as they would have). The report says how many calls would change action, from
what to what (a matrix), with examples, so an admin sees the effect of a new rule or weight on
real traffic before switching it on.

What cannot be replayed exactly, and how it is handled:
  * rules that other fact sources added at the time (behaviour history, reputation: rules the
    call itself does not produce) are carried over from the call log with the NEW config's
    weight, group and force (a rule the new config disables or drops is dropped);
  * callingpres is not recorded: a withheld presentation shows only through the caller text;
  * in log-only mode the action sent was ``allow``: both sides compare the decided action
    (``would`` when recorded), not what the dial plan was told.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from edgefilter.core.config import BUILTIN_RULES, Settings
from edgefilter.core.durations import parse_duration
from edgefilter.core.errors import EdgefilterError
from edgefilter.core.model import Action, Call, Hit
from edgefilter.lists.index import ListIndex
from edgefilter.outputs.decisionlog import escape_text
from edgefilter.rules.policy import PolicyBook
from edgefilter.rules.screen import Screener
from edgefilter.store.open import open_store, store_exists
from edgefilter.store.sqlite import CallRecord

ACTIONS = tuple(a.value for a in Action)


@dataclass
class Example:
    ts: float
    caller: str
    old_rules: str
    new_rules: str
    new_score: float


@dataclass
class ReplayReport:
    total: int = 0
    changed: int = 0
    matrix: Counter = field(default_factory=Counter)  # (from, to) -> calls
    examples: dict[tuple[str, str], list[Example]] = field(default_factory=dict)
    carried: Counter = field(default_factory=Counter)  # source rules carried over from the log
    dropped: Counter = field(default_factory=Counter)  # recorded rules the new config no longer has


def record_call(r: CallRecord) -> Call:
    """The Call as Asterisk described it, rebuilt from the call log."""
    return Call(
        callerid=r.caller,
        calleridname=r.caller_name,
        dnid=r.called,
        extension=r.extension,
        context=r.context,
        uniqueid=r.uniqueid,
        params={"exten": r.extension} if r.extension else {},
    )


#: Built-in rules that fact sources fire, not the call itself (challenge failures, online
#: reputation): the replay runs no such source, so they are carried over like the behaviour rules.
SOURCE_RULES = frozenset({"CHALLENGE_FAILED", "REPUTATION_LISTED", "REPUTATION_PENDING", "REPUTATION_ERROR", "REPUTATION_UNAVAILABLE"})


def replay_calls(
    records: list[CallRecord], settings: Settings, index: ListIndex, *, now: float | None = None, examples: int = 3
) -> ReplayReport:
    """Decide every record again under ``settings``; pure apart from the clock default."""
    screener = Screener(settings, index, clock=lambda: now if now is not None else time.time())
    book = PolicyBook(settings)
    own = (set(BUILTIN_RULES) - SOURCE_RULES) | {n for n, r in settings.rules.items() if r.name_pattern is not None}
    rep = ReplayReport()
    tz = settings.tz
    for r in records:
        call = record_call(r)
        when = datetime.fromtimestamp(r.ts, tz).replace(tzinfo=None) if tz else datetime.fromtimestamp(r.ts)
        extra: list[Hit] = []
        eff = None
        for name in r.rules.split():
            if name in own:
                continue
            rule = settings.rules.get(name)
            if rule is None or not rule.enabled:
                rep.dropped[name] += 1
                continue
            eff = eff or book.resolve(call, when)
            extra.append(Hit(name, round(eff.weight(name, rule.weight), 3), rule.group, "carried over from the call log", rule.force))
            rep.carried[name] += 1
        d = screener.decide(call, when=when, extra=extra)
        old = r.would or r.action
        new = (d.verdict.would or d.verdict.action).value
        rep.total += 1
        rep.matrix[(old, new)] += 1
        if old != new:
            rep.changed += 1
            ex = rep.examples.setdefault((old, new), [])
            if len(ex) < examples:
                ex.append(Example(r.ts, r.caller, r.rules, " ".join(d.verdict.rules), d.verdict.score))
    return rep


def format_report(rep: ReplayReport, since_text: str, config_sources: tuple[str, ...]) -> list[str]:
    out = [f"replayed {rep.total} calls since {since_text} under {', '.join(config_sources)}"]
    if not rep.total:
        return out
    pct = rep.changed * 100.0 / rep.total
    out.append(f"{rep.changed} would change action ({pct:.1f}%), {rep.total - rep.changed} unchanged")
    used = [a for a in ACTIONS if any(k[0] == a or k[1] == a for k in rep.matrix)]
    out.append("")
    out.append("recorded \\ replayed " + "".join(f"{a:>11}" for a in used))
    for a in used:
        if any(k[0] == a for k in rep.matrix):
            out.append(f"{a:<19} " + "".join(f"{rep.matrix.get((a, b), 0) or '.':>11}" for b in used))
    for (old, new), exs in sorted(rep.examples.items(), key=lambda kv: -rep.matrix[kv[0]]):
        out.append("")
        out.append(f"{old} -> {new}: {rep.matrix[(old, new)]} calls, e.g.")
        for e in exs:
            ts = datetime.fromtimestamp(e.ts).strftime("%Y-%m-%d %H:%M")
            out.append(
                f"  {ts}  {escape_text(e.caller, 40):<20} was [{escape_text(e.old_rules, 80) or '-'}] "
                f"now [{e.new_rules or '-'}] score {e.new_score:g}"
            )
    if rep.carried:
        out.append("")
        out.append("carried over from the log (not re-computed): " + ", ".join(f"{k} x{v}" for k, v in rep.carried.most_common()))
    if rep.dropped:
        out.append("dropped (not in the new config or disabled): " + ", ".join(f"{k} x{v}" for k, v in rep.dropped.most_common()))
    return out


async def cmd_replay(args, settings: Settings) -> int:
    """``settings`` is the NEW config (--config); the call log and lists come from --db or its store."""
    if args.db:  # another SQLite file than the configured store
        settings = dataclasses.replace(settings, store=dataclasses.replace(settings.store, path=args.db, url=""))
    db = args.db or settings.store.path
    if not store_exists(settings):
        raise EdgefilterError(f"{db}: database does not exist (no calls recorded yet)")
    try:
        since_s = parse_duration(args.since)
    except ValueError as e:
        raise EdgefilterError(f"--since: {e}") from None
    now = time.time()
    async with open_store(settings, create=False) as store:
        records = await store.recent_calls(now - since_s, limit=args.limit)
        _, index = await store.load_index()
    rep = replay_calls(records, settings, index, now=now, examples=args.examples)
    for line in format_report(rep, f"{args.since} ago", settings.sources or ("built-in defaults",)):
        print(line)
    return 0


def add_parser(sub, common) -> None:
    p = sub.add_parser("replay", parents=[common], help="re-decide recorded calls under another config (what-if)")
    p.add_argument("--since", default="7d", help="how far back (default 7d)")
    p.add_argument("--db", metavar="PATH", help="database holding the call log and lists (default: the config's [store] path)")
    p.add_argument("--examples", type=int, default=3, help="examples shown per change (default 3)")
    p.add_argument("--limit", type=int, default=1_000_000, help="at most this many calls (oldest first)")
    p.set_defaults(func=cmd_replay)
