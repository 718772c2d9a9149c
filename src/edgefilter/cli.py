"""The `edgefilter` command: serve, manage lists, explain verdicts, place test calls, check config.

Every subcommand takes ``--config FILE`` after its name. Errors are one clear line on stderr and
exit status 1 (2 for usage mistakes, from argparse); no tracebacks for anything an admin can fix.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import datetime
from pathlib import Path

from .config import Settings, dump, load_settings
from .decisionlog import escape_text
from .errors import EdgefilterError, PatternError
from .lists import LISTS, MAX_NOTE, Entry, ListIndex, parse_pattern
from .model import Call
from .scoring import explain
from .screen import Screener, channel_variables
from .imports import add_parsers as add_import_parsers, parse_expires
from .replay import add_parser as add_replay_parser
from .store import Store


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
    async with Store.open(settings.store.path) as store:
        result = await store.put_entry(entry)
    exp = f", expires {_fmt_time(entry.expires_at)}" if entry.expires_at else ""
    print(f"{args.list} {pattern.text} ({pattern.kind}): {result}{exp}")
    return 0


async def cmd_remove(args, settings: Settings) -> int:
    pattern = parse_pattern(args.pattern, args.region or settings.default_region)
    async with Store.open(settings.store.path) as store:
        removed = await store.remove_entry(pattern, args.list)
    if not removed:
        print(f"{pattern.text}: not on {'the ' + args.list + ' list' if args.list else 'any list'}", file=sys.stderr)
        return 1
    print(f"{pattern.text}: removed from {' and '.join(removed)}")
    return 0


async def cmd_list(args, settings: Settings) -> int:
    if not Path(settings.store.path).exists():
        print("(no entries: the database does not exist yet)")
        return 0
    async with Store.open(settings.store.path, create=False) as store:
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
    if number.digits and Path(settings.store.path).exists():
        async with Store.open(settings.store.path, create=False) as store:
            idx = ListIndex()
            idx.extend(await store.candidates(number.digits))
        screener.index = idx
    d = screener.decide(call, when=when)
    print(f"caller: {escape_text(args.number)} -> {d.number.e164 or '-'} ({d.number.kind.value}{': ' + d.number.reason if d.number.reason else ''})")
    print(f"called: {escape_text(call.called) or '-'}  context: {call.context or '-'}  time: {d.when:%Y-%m-%d %H:%M} ({d.when:%a})")
    for line in explain(d.verdict, d.effective):
        print(line)
    vars_ = channel_variables(d, settings)
    print("variables: " + " ".join(f"{k}={v!r}" for k, v in vars_.items()))
    return 0


async def cmd_try_call(args, settings: Settings) -> int:
    from .callsim import CallSpec, place_call

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


def cmd_config(args, settings: Settings) -> int:
    if args.action == "dump":
        print(dump(settings))
    else:
        rules = len(settings.rules)
        print(f"config OK: {', '.join(settings.sources)}")
        print(f"  {rules} rules, {len(settings.categories)} categories, {len(settings.policies)} policies, {len(settings.schedules)} schedules")
        thr = ", ".join(f"{a.value} {t:g}" for a, t in settings.thresholds.items())
        print(f"  thresholds: {thr}; mode {settings.screen.mode}; on_error {settings.screen.on_error.value}")
    return 0


# ------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgefilter", description="Harassment-call filter for Asterisk (FastAGI).")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="config file (default: $EDGEFILTER_CONFIG, ./edgefilter.toml, /etc/edgefilter/edgefilter.toml, else built-in defaults)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("serve", parents=[common], help="run the FastAGI screening service")

    for name in LISTS:
        p = sub.add_parser(name, parents=[common], help=f"add a number, prefix (+86170*) or mask (+4121560####) to the {name}list")
        p.add_argument("pattern", metavar="NUMBER_OR_PATTERN")
        p.add_argument("--note", help="why (shown in list and explanations)")
        p.add_argument("--expires", metavar="WHEN", help="duration from now (30d) or a date (YYYY-MM-DD)")
        p.add_argument("--category", help="category (harassment, marketing, fraud, ...)")
        p.add_argument("--source", default="cli", help="source tag (default: cli)")
        p.add_argument("--region", help="ISO region for national forms (default: [numbers] default_region)")
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

    add_import_parsers(sub, common, LISTS)
    add_replay_parser(sub, common)

    p = sub.add_parser("config", parents=[common], help="check or dump the merged configuration")
    p.add_argument("action", choices=("check", "dump"))
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            from .service import serve

            asyncio.run(serve(args.config))
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
