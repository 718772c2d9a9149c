"""The `edgefilter` command: serve, manage lists, explain verdicts, place test calls, check config.

Every subcommand takes ``--config FILE`` after its name. Errors are one clear line on stderr and
exit status 1 (2 for usage mistakes, from argparse); no tracebacks for anything an admin can fix.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from edgefilter.appeals_cli import add_parser as add_appeals_parser
from edgefilter.asterisk.challenge import ChallengeFailures
from edgefilter.core.config import Settings, dump, load_settings, redact_url
from edgefilter.core.durations import parse_duration, parse_offset_or_date
from edgefilter.core.errors import EdgefilterError, PatternError
from edgefilter.core.model import Call
from edgefilter.imports import add_parsers as add_import_parsers
from edgefilter.imports import parse_expires
from edgefilter.lists.index import LISTS, MAX_NOTE, Entry, ListIndex, parse_pattern
from edgefilter.outputs.decisionlog import escape_text
from edgefilter.replay import add_parser as add_replay_parser
from edgefilter.rules.scoring import explain
from edgefilter.rules.screen import Screener, channel_variables
from edgefilter.store.open import copy_sqlite_to_postgres, open_store, store_exists


def _parse_when(text: str) -> datetime:
    for fmt in ("%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%H:%M"):
        try:
            t = datetime.strptime(text, fmt)
        except ValueError:
            continue
        if fmt == "%H:%M":
            t = datetime.now().replace(hour=t.hour, minute=t.minute, second=0, microsecond=0)
        return t
    raise EdgefilterError(f"--at {text!r}: expected \"YYYY-MM-DD HH:MM\" or \"HH:MM\"")


def _fmt_time(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


# ------------------------------------------------------------------------------- commands
async def cmd_add(args, settings: Settings) -> int:
    pattern = parse_pattern(args.pattern, args.region or settings.default_region)
    if args.category and args.category not in settings.categories:
        raise EdgefilterError(
            f"unknown category {args.category!r}; configured: {', '.join(sorted(settings.categories))}"
        )
    note = args.note or ""
    if len(note) > MAX_NOTE:
        raise EdgefilterError(f"--note is longer than {MAX_NOTE} characters")
    now = time.time()
    entry = Entry(
        list=args.list,
        pattern=pattern,
        category=args.category or "",
        note=note,
        source=args.source,
        created_at=now,
        expires_at=parse_expires(args.expires, now),
    )
    no_appeal = getattr(args, "no_appeal", False)
    async with open_store(settings) as store:
        async with store.transaction():  # the entry and its appeal flag reach the service together
            result = await store.put_entry(entry)
            if args.list == "block":
                await store.set_no_appeal("block", pattern, no_appeal)
    exp = f", expires {_fmt_time(entry.expires_at)}" if entry.expires_at else ""
    print(f"{args.list} {pattern.text} ({pattern.kind}): {result}{exp}{', never appealable' if no_appeal else ''}")
    return 0


async def cmd_remove(args, settings: Settings) -> int:
    pattern = parse_pattern(args.pattern, args.region or settings.default_region)
    async with open_store(settings) as store:
        removed = await store.remove_entry(pattern, args.list)
    if not removed:
        print(f"{pattern.text}: not on {'the ' + args.list + ' list' if args.list else 'any list'}", file=sys.stderr)
        return 1
    print(f"{pattern.text}: removed from {' and '.join(removed)}")
    return 0


async def cmd_list(args, settings: Settings) -> int:
    if not store_exists(settings):
        print("(no entries: the database does not exist yet)")
        return 0
    async with open_store(settings, create=False) as store:
        entries = await store.entries(args.which, include_expired=args.all)
    now = time.time()
    print(f"{'list':<6} {'pattern':<22} {'kind':<7} {'category':<16} {'expires':<17} {'source':<12} note")
    for e in entries:
        exp = _fmt_time(e.expires_at) + (" (expired)" if not e.active(now) else "")
        print(
            f"{e.list:<6} {e.pattern.text:<22} {e.pattern.kind:<7} {e.category or '-':<16} {exp:<17} "
            f"{escape_text(e.source, 24):<12} {escape_text(e.note, 80)}"
        )
    print(f"{len(entries)} entries")
    return 0


async def cmd_check(args, settings: Settings) -> int:
    call = Call(
        callerid=args.number,
        calleridname=args.name or "",
        dnid=args.to or "",
        extension=args.exten or args.to or "",
        context=args.context or "",
        callingpres=32 if args.withheld else 0,
        params={"exten": args.exten} if args.exten else {},
    )
    when = _parse_when(args.at) if args.at else None
    screener = Screener(settings)
    number = screener.decide(call, when=when).number
    if number.digits and store_exists(settings):
        async with open_store(settings, create=False) as store:
            idx = ListIndex()
            idx.extend(await store.candidates(number.digits))
            failures = ChallengeFailures(lambda: settings)
            failures.load(await store.challenge_failures_since(time.time() - settings.challenge.fail_window, number.e164))
            screener.sources.append(failures)
        screener.index = idx
    d = screener.decide(call, when=when)
    notes: list[str] = []
    if settings.reputation.active and store_exists(settings):
        extra, notes = await _cached_reputation(settings, screener, d)
        if extra:
            d = screener.decide(call, when=when, extra=extra)
    print(f"caller: {escape_text(args.number)} -> {d.number.e164 or '-'} ({d.number.kind.value}{': ' + d.number.reason if d.number.reason else ''})")
    print(f"called: {escape_text(call.called) or '-'}  context: {call.context or '-'}  time: {d.when:%Y-%m-%d %H:%M} ({d.when:%a})")
    for line in explain(d.verdict, d.effective):
        print(line)
    vars_ = channel_variables(d, settings)
    print("variables: " + " ".join(f"{k}={v!r}" for k, v in vars_.items()))
    for note in notes:
        print(note)
    return 0


async def _cached_reputation(settings: Settings, screener: Screener, d) -> tuple[list, list[str]]:
    """What the service would add from cached reputation answers (`check` never asks a source)."""
    from edgefilter.reputation.client import answer_from_row
    from edgefilter.reputation.lookup import answer_hit, never_block_index, private_reason

    now = time.time()
    why = private_reason(d.call, d.number, now, screener.index, never_block_index(settings))
    if why is not None:
        return [], []
    async with open_store(settings, create=False) as store:
        rows = {r.source: r for r in await store.reputation_rows(number=d.number.e164, fresh_at=now)}
    hits, notes = [], []
    for src in settings.reputation.active:
        row = rows.get(src.name)
        if row is None:
            notes.append(f"reputation: {src.name} has no cached answer; the service would ask it (`edgefilter lookup` shows what it says)")
            continue
        hit = answer_hit(settings, d.effective, src, answer_from_row(row), now)
        if hit is not None:
            hits.append(hit)
    return hits, notes


async def cmd_try_call(args, settings: Settings) -> int:
    from edgefilter.asterisk.callsim import CallSpec, place_call

    host, port = settings.agi.listen
    host = args.host or host
    port = args.port or port
    spec = CallSpec(
        callerid=args.caller,
        calleridname=args.name if args.name is not None else "unknown",
        dnid=args.to,
        extension=args.exten or args.to,
        context=args.context,
        args=tuple(args.arg or ()),
    )
    result = await place_call(host, port, spec, timeout=args.timeout)
    if result.agistatus == "FAILURE":
        print(f"AGISTATUS=FAILURE: nothing answered on {host}:{port} (the dial plan would fail open and ring)")
        return 1
    print(f"AGISTATUS={result.agistatus} in {result.elapsed * 1000:.2f} ms")
    if result.timed_out:
        print(f"(the service did not close the connection within {args.timeout:g} s)")
    if not result.variables:
        print("(no variables set: the dial plan would fail open and ring)")
    for k, v in result.variables.items():
        print(f"{k}={v}")
    return 0 if not result.timed_out else 1


async def cmd_stats(args, settings: Settings) -> int:
    import json

    from edgefilter.outputs.report import render_html, render_text
    from edgefilter.outputs.stats import StatsBuilder

    try:
        span = parse_duration(args.since)
    except ValueError as e:
        raise EdgefilterError(f"--since: {e}") from None
    if span <= 0:
        raise EdgefilterError("--since must be longer than 0s")
    if args.top < 1:
        raise EdgefilterError("--top must be at least 1")
    until = time.time()
    since = until - span
    builder = StatsBuilder(since=since, until=until, tz=settings.tz, top=args.top)
    appeals = []
    if store_exists(settings):
        async with open_store(settings, create=False) as store:
            async for batch in store.iter_calls(since, until):
                for row in batch:
                    builder.add(row)
            appeals = await store.appeals(since=since)
    st = builder.result()
    if appeals:  # rule precision from appeals (issue 17)
        from edgefilter.outputs.stats import appeal_precision

        st = dataclasses.replace(st, appeals=appeal_precision(appeals, st.refused_rules, since=since, until=until))
    if args.json:
        print(json.dumps(st.as_dict(), indent=2, ensure_ascii=True))
    else:
        print(render_text(st, settings.tz))
    if args.html:
        out = Path(args.html)
        try:
            out.write_text(render_html(st, tz=settings.tz), encoding="utf-8")
        except OSError as e:
            raise EdgefilterError(f"--html {args.html}: cannot write: {e.strerror}") from None
        if not args.json:
            print(f"report written to {out}")
    return 0


def _reputation_sources(args, settings: Settings):
    sources = list(settings.reputation.sources)
    if args.source:
        chosen = [src for src in sources if src.name == args.source]
        if not chosen:
            from edgefilter.core.config import _suggest

            names = [src.name for src in sources]
            raise EdgefilterError(
                f"--source {args.source!r}: no such reputation source{_suggest(args.source, names)}"
                f"; configured: {', '.join(names) or 'none'}"
            )
        return chosen
    return [src for src in sources if src.enabled]


async def cmd_lookup(args, settings: Settings) -> int:
    from edgefilter.core.model import NumberKind
    from edgefilter.core.numbers import normalize
    from edgefilter.reputation import ReputationClient, weight_of
    from edgefilter.reputation.client import answer_from_row
    from edgefilter.reputation.lookup import never_block_index, private_reason

    sources = _reputation_sources(args, settings)
    if not sources:
        print("no reputation sources configured: declare them under [reputation.sources.NAME] (docs/reputation.md)")
        return 1
    number = normalize(args.number, settings.default_region)
    print(f"number: {escape_text(args.number)} -> {number.e164 or '-'} ({number.kind.value}{': ' + number.reason if number.reason else ''})")
    e164, digits = number.e164, number.digits
    if number.kind is not NumberKind.VALID or not e164 or not digits:  # a valid number always has both
        print("not looked up: only valid public numbers are ever sent to a reputation source")
        return 0
    async with open_store(settings) as store:
        index = ListIndex()
        index.extend(await store.candidates(digits))
        why = private_reason(Call(callerid=e164), number, time.time(), index, never_block_index(settings))
        if why is not None:
            print(f"not looked up: the number is in the {why} (numbers on the allowlist never leave this machine)")
            return 0
        client = ReputationClient(settings.reputation, store)
        await client.start(warm=False, background=False)
        try:
            for src in sources:
                now = time.time()
                print(f"{src.name}:{'' if src.enabled else ' (enabled = false: the service does not ask it)'}")
                row = await store.get_reputation(src.name, e164)
                fresh = row is not None and row.expires_at > now
                if row is None:
                    print("  cached: nothing")
                else:
                    cached = answer_from_row(row)
                    weight, why = weight_of(src, cached)
                    state = "expires" if fresh else "expired"
                    print(f"  cached: {escape_text(cached.describe())} -> weight {weight:+g} ({escape_text(why)}); "
                          f"fetched {_fmt_time(row.fetched_at)}, {state} {_fmt_time(row.expires_at)}")
                if args.cached_only:
                    continue
                store_it = args.refresh or not fresh
                answer = await client.ask(src, e164, remember=store_it)
                if not store_it:
                    note = "cache kept (still fresh; --refresh replaces it)"
                else:
                    note = f"cached until {_fmt_time(answer.expires_at)}" if answer.ok else "not cached"
                http = f"HTTP {answer.http_status}, " if answer.http_status is not None else ""
                if answer.ok:
                    weight, why = weight_of(src, answer)
                    print(f"  live:   {escape_text(answer.describe())} -> weight {weight:+g} ({escape_text(why)}); {http}{answer.elapsed_ms:.0f} ms; {note}")
                else:
                    print(f"  live:   {answer.status}: {escape_text(answer.reason, 200)}; {http}{answer.elapsed_ms:.0f} ms; {note}")
            await client.flush()
        finally:
            await client.close()
    return 0


async def cmd_cache(args, settings: Settings) -> int:
    if not store_exists(settings):
        print("(no cached answers: the database does not exist yet)")
        return 0
    now = time.time()
    async with open_store(settings, create=False) as store:
        if args.action == "purge":
            n = await store.purge_reputation(source=args.source, expired_at=now if args.expired else None)
            what = ("expired " if args.expired else "") + "reputation answers" + (f" of {args.source}" if args.source else "")
            print(f"purged {n} {what}")
            print("a running service drops its in-memory copies on SIGHUP (systemctl reload edgefilter)")
            return 0
        rows = await store.reputation_rows()
    stats: dict[str, list[int]] = {}
    for r in rows:
        if args.source and r.source != args.source:
            continue
        st = stats.setdefault(r.source, [0, 0, 0])
        st[0 if r.expires_at > now else 2] += 1
        if r.expires_at > now and r.status == "listed":
            st[1] += 1
    print(f"{'source':<20} {'fresh':>8} {'listed':>8} {'expired':>8}")
    for name, (fresh, listed, expired) in sorted(stats.items()):
        print(f"{escape_text(name, 20):<20} {fresh:>8} {listed:>8} {expired:>8}")
    return 0


async def cmd_evidence(args, settings: Settings) -> int:
    from edgefilter import __version__
    from edgefilter.core.numbers import normalize
    from edgefilter.outputs.evidence import build, to_csv, to_html

    number = normalize(args.number, args.region or settings.default_region)
    if not number.e164:
        raise EdgefilterError(f"{escape_text(args.number, 40)}: {number.reason or 'not a phone number'}")
    now = time.time()
    since = _parse_since(args.since, now)
    if not store_exists(settings):
        raise EdgefilterError(f"{settings.store.where}: database does not exist (no calls recorded yet)")
    async with open_store(settings, create=False) as store:
        calls = await store.calls_from(number.e164, since)
        refusals = await store.refusals(caller=number.e164)
        appeals = await store.appeals(caller=number.e164, since=since)
    tz = settings.tz or datetime.now().astimezone().tzinfo or UTC  # (astimezone always sets one)
    ev = build(number.e164, calls, refusals, since=since, until=now, tz=tz, scope=settings.behaviour.refusal_scope,
               appeals=appeals)
    text = to_csv(ev) if args.format == "csv" else to_html(ev, generated=now, version=__version__)
    if args.output:
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as e:
            raise EdgefilterError(f"{args.output}: cannot write ({e.strerror})") from None
        print(f"{number.e164}: {ev.totals['calls']} calls, {ev.totals['calls_after_refusal']} after refusal -> {args.output}",
              file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _parse_since(text: str, now: float) -> float:
    """``--since 90d`` (back from now) or ``--since 2026-01-31`` (local midnight)."""
    try:
        return parse_offset_or_date(text, now, sign=-1)
    except ValueError:
        raise EdgefilterError(f"--since {text!r}: use a duration such as 90d or a date YYYY-MM-DD") from None


async def cmd_db(args, settings: Settings) -> int:
    from edgefilter.store.postgres import PgStore

    if args.action == "migrate":
        async with open_store(settings) as store:  # opening migrates
            version = await store.migrate()
            counts = await store.counts()
        print(f"{settings.store.backend} {settings.store.where}: schema v{version}, "
              f"{counts['block']} block / {counts['allow']} allow entries")
        return 0
    # copy
    if not args.source or not args.target:
        raise EdgefilterError("db copy needs --from SQLITE_PATH and --to POSTGRES_URL")
    if not re.match(r"^postgres(ql)?://\S+$", args.target):
        raise EdgefilterError(f"--to: expected postgresql://user@host:port/database, got {escape_text(args.target, 80)!r}")
    if args.node and not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", args.node):
        raise EdgefilterError("--node: 1-64 letters, digits, '.', '_' or '-'")
    target = dataclasses.replace(settings.store, url=args.target)
    node = args.node or settings.store.node
    async with open_store(target) as dst:
        if not isinstance(dst, PgStore):  # a postgresql:// url (checked above) always opens one
            raise EdgefilterError(f"--to: {redact_url(args.target)} did not open a PostgreSQL store")
        report = await copy_sqlite_to_postgres(args.source, dst, node=node)
    print(f"copied {args.source} -> {redact_url(args.target)} (calls tagged node {node})")
    for line in report.lines():
        print("  " + line)
    return 0


def cmd_config(args, settings: Settings) -> int:
    if args.action == "dump":
        print(dump(settings))
    else:
        if settings.ami.enabled:
            from edgefilter.asterisk.ami import load_secret

            load_secret(settings.ami)  # a group-readable secret file fails here, not at start-up
        rules = len(settings.rules)
        print(f"config OK: {', '.join(settings.sources)}")
        print(f"  {rules} rules, {len(settings.categories)} categories, {len(settings.policies)} policies, {len(settings.schedules)} schedules")
        thr = ", ".join(f"{a.value} {t:g}" for a, t in settings.thresholds.items())
        print(f"  thresholds: {thr}; mode {settings.screen.mode}; on_error {settings.screen.on_error.value}")
        o = settings.outputs

        def where(a: tuple[str, int] | None) -> str:
            return "off" if a is None else (f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}")

        print(f"  outputs: statsd {where(o.statsd)}, syslog {where(o.syslog)}, prometheus {where(o.prometheus)}")
        rep = settings.reputation
        if rep.sources:
            names = ", ".join(src.name + ("" if src.enabled else " (disabled)") for src in rep.sources)
            wait = max(0.0, settings.screen.budget - rep.margin) * 1000
            print(f"  reputation sources: {names}; calls wait for them at most {wait:g} ms")
        if settings.ami.enabled:
            print(f"  AMI: {settings.ami.user}@{settings.ami.host}:{settings.ami.port}, secret readable")
    return 0


# ------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgefilter", description="Harassment-call filter for Asterisk (FastAGI).")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="config file (default: $EDGEFILTER_CONFIG, ./edgefilter.toml, "
                                                          "/etc/edgefilter/edgefilter.toml, else built-in defaults)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", parents=[common], help="run the FastAGI screening service")
    p.add_argument("--workers", type=int, metavar="N", help="worker processes on the listen port (overrides [agi] workers)")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # set by the pool for its children

    for name in LISTS:
        p = sub.add_parser(name, parents=[common], help=f"add a number, prefix (+86170*) or mask (+4121560####) to the {name}list")
        p.add_argument("pattern", metavar="NUMBER_OR_PATTERN")
        p.add_argument("--note", help="why (shown in list and explanations)")
        p.add_argument("--expires", metavar="WHEN", help="duration from now (30d) or a date (YYYY-MM-DD)")
        p.add_argument("--category", help="category (harassment, marketing, fraud, ...)")
        p.add_argument("--source", default="cli", help="source tag (default: cli)")
        p.add_argument("--region", help="ISO region for national forms (default: [numbers] default_region)")
        if name == "block":
            p.add_argument("--no-appeal", action="store_true",
                           help="a refusal by this entry is never appealable from the call ([appeal]); "
                                "without it, blocking an entry again makes it appealable")
        p.set_defaults(func=cmd_add, list=name)

    p = sub.add_parser("remove", parents=[common], help="remove a number or pattern from the lists")
    p.add_argument("pattern", metavar="NUMBER_OR_PATTERN")
    p.add_argument("--list", choices=LISTS, help="only from this list (default: both)")
    p.add_argument("--region")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("list", parents=[common], help="show list entries")
    p.add_argument("which", nargs="?", choices=LISTS)
    p.add_argument("--all", action="store_true", help="include expired entries")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("check", parents=[common], help="explain the verdict the service would give")
    p.add_argument("number", metavar="NUMBER")
    p.add_argument("--to", metavar="DID", help="the number or extension called")
    p.add_argument("--exten", help="the dial-plan extension, if different from --to")
    p.add_argument("--context", default="from-trunk")
    p.add_argument("--name", help="caller name")
    p.add_argument("--at", metavar="\"YYYY-MM-DD HH:MM\"", help="decide as at this time (schedules)")
    p.add_argument("--withheld", action="store_true", help="presentation restricted (callingpres 32)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("try-call", parents=[common], help="speak FastAGI to a running service as Asterisk would")
    p.add_argument("caller", metavar="CALLER")
    p.add_argument("--to", default="1000", help="DID / extension called (default 1000)")
    p.add_argument("--exten")
    p.add_argument("--context", default="from-trunk")
    p.add_argument("--name", help="caller name")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--arg", action="append", help="extra AGI argument (repeatable), e.g. cidfiltered=1")
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(func=cmd_try_call)

    p = sub.add_parser("stats", parents=[common], help="what happened: calls per action, share blocked, top rules and callers, latency")
    p.add_argument("--since", default="24h", metavar="DURATION", help="period ending now (default 24h; e.g. 1h, 7d)")
    p.add_argument("--html", metavar="FILE", help="also write a one-page HTML report with charts to FILE")
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead of text")
    p.add_argument("--top", type=int, default=10, metavar="N", help="rules and callers listed (default 10)")
    p.set_defaults(func=cmd_stats)
    p = sub.add_parser("lookup", parents=[common], help="what each reputation source says about a number (live, timed) and what is cached")
    p.add_argument("number", metavar="NUMBER")
    p.add_argument("--source", metavar="NAME", help="only this source")
    p.add_argument("--refresh", action="store_true", help="replace a still-fresh cached answer with the live one")
    p.add_argument("--cached-only", action="store_true", help="show the cache only; ask no source")
    p.set_defaults(func=cmd_lookup)

    p = sub.add_parser("cache", parents=[common], help="the reputation cache: purge or show stats")
    p.add_argument("action", choices=("purge", "stats"))
    p.add_argument("--source", metavar="NAME", help="only this source's answers")
    p.add_argument("--expired", action="store_true", help="purge only expired answers")
    p.set_defaults(func=cmd_cache)
    p = sub.add_parser("evidence", parents=[common], help="timeline of every call from a number (CSV or HTML), for a complaint")
    p.add_argument("number", metavar="NUMBER")
    p.add_argument("--format", choices=("csv", "html"), default="csv")
    p.add_argument("--since", default="90d", help="how far back: a duration (90d) or a date YYYY-MM-DD (default 90d)")
    p.add_argument("--output", metavar="FILE", help="write here instead of standard output")
    p.add_argument("--region", help="ISO region for a national-format NUMBER (default: [numbers] default_region)")
    p.set_defaults(func=cmd_evidence)

    p = sub.add_parser("db", parents=[common], help="database schema and moves: migrate, copy")
    p.add_argument("action", choices=("migrate", "copy"),
                   help="migrate: bring the configured store's schema up to date; copy: SQLite -> PostgreSQL")
    p.add_argument("--from", dest="source", metavar="SQLITE_PATH", help="copy: the single-box SQLite database")
    p.add_argument("--to", dest="target", metavar="POSTGRES_URL", help="copy: postgresql://user@host:port/db (password: [store] password_file or PGPASSWORD)")
    p.add_argument("--node", help="copy: node name the copied call records get (default: [store] node)")
    p.set_defaults(func=cmd_db)
    add_import_parsers(sub, common, LISTS)
    add_replay_parser(sub, common)
    add_appeals_parser(sub, common)

    p = sub.add_parser("config", parents=[common], help="check or dump the merged configuration")
    p.add_argument("action", choices=("check", "dump"))
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            from edgefilter import eventloop
            from edgefilter.service import serve

            if args.workers is not None and not 1 <= args.workers <= 64:
                parser.error("--workers must be between 1 and 64")
            settings = load_settings(args.config)
            eventloop.run(serve(args.config, workers=args.workers, worker=args.worker, settings=settings),
                          settings.agi.event_loop)
            return 0
        settings = load_settings(args.config)
        result = args.func(args, settings)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return int(result or 0)
    except (EdgefilterError, PatternError) as e:
        print(f"edgefilter: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        print(f"edgefilter: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
